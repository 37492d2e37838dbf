"""Low-bit kernels (Triton) with their pure-PyTorch references, chosen per call by ``dispatch.backend_for``."""
