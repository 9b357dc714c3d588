"""The precision names a run may ask for, in a module without torch: the config and the command line name
them (``--precision``, ``train.precision``) before anything trains. ``engine.precision`` resolves them."""

__all__ = ["PRECISIONS"]

#: ``auto`` resolves per device (``engine.precision.resolve_precision``): bf16 on a GPU or a CPU with AMX.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
