"""Device backends: ``cpu`` (thread lanes) and ``cuda`` (streams and events); ``threads`` and
``measure`` serve them. The simulated backend lives in ``zoruntime.planning``.

Import the module you need (``zoruntime.device.cpu``); this package imports nothing itself.
"""
