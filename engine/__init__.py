"""The generation library Triton hosts: requests, the concept cache, per-sample K/V, text encoding,
the batched generation loop, and the ONNX export and UNet. No grpc, no Triton client, no `services`."""
