"""``python -m tridlm.kernels``: build the CPU kernels now, ahead of the first forward (``make setup`` runs it)."""

from tridlm.kernels import _module

if _module() is None:
    print("tridlm: the CPU kernels are not built here; torch's ops will run instead")
