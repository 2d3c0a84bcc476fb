"""Device kernels for the fp4 ops; each is tested against the reference in ``formats``."""
