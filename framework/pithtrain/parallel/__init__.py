"""Distributed training: the device mesh and sharding (mesh.py), expert parallelism (expert.py), pipeline schedules
(pipeline.py). Built on torch.distributed: FSDP2, DTensor, DCP, gloo on CPU and NCCL on GPUs."""
