import shutil
import subprocess
import sys
from pathlib import Path

PROTO = Path(__file__).resolve().parents[1] / "proto"


def test_buf_lint_standard_passes():
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    result = subprocess.run([buf, "lint"], cwd=PROTO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_is_generated():
    from customdiffusion.v1 import (
        concept_service_pb2_grpc,
        inference_service_pb2_grpc,
        merger_service_pb2_grpc,
        trainer_service_pb2_grpc,
    )

    assert hasattr(trainer_service_pb2_grpc, "TrainerServiceServicer")
    assert hasattr(merger_service_pb2_grpc, "MergerServiceServicer")
    assert hasattr(inference_service_pb2_grpc, "InferenceServiceServicer")
    assert hasattr(concept_service_pb2_grpc, "ConceptServiceServicer")
