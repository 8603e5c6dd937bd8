"""Device backends: ``cpu`` (thread lanes), ``simulated`` (virtual clock, no torch), ``threads``.

Import the module you need (``zoruntime.device.cpu``); this package imports nothing itself,
so the simulated backend loads without torch.
"""
