"""One registry of scheduler names (engine/schedulers.py): the request, the proto enum, the front and the CLI agree."""

from customdiffusion.v1 import inference_service_pb2 as pb
from customdiff.__main__ import build_parser
from engine.request import GenerationRequest
from engine.schedulers import SCHEDULERS
from services.inference.servicer import SCHEDULERS as PROTO_SCHEDULERS


def test_every_name_has_one_proto_value_and_back():
    assert sorted(PROTO_SCHEDULERS.values()) == sorted(SCHEDULERS)
    assert PROTO_SCHEDULERS[pb.SCHEDULER_UNSPECIFIED] == "" and PROTO_SCHEDULERS[pb.SCHEDULER_EULER] == "euler"
    for name in SCHEDULERS:
        assert GenerationRequest("a dog", scheduler=name).scheduler == name


def test_the_cli_offers_exactly_the_registry():
    args = build_parser().parse_args(["generate", "--base", "b", "--store", "s", "--prompt", "p", "--out", "o",
                                      "--scheduler", "dpm_solver_multistep"])
    assert args.scheduler == "dpm_solver_multistep"
