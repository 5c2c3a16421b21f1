"""Local models: diffusion pipelines run in the worker process, on its GPU.

Only GPU workers (the queues of local models) import this package, and with it
torch and diffusers (the ``local`` extra); every other process stays light.

- ``pipelines.py``: where a model runs (device, dtype); loading it on demand
  within the device's memory budget (image-to-image and inpainting share its
  weights), unloading the least recently used model not in use (``using``) when
  another needs the room, preloading; and the lock that lets one pipeline call at
  a time use a device.
- ``diffusion.py``: the provider: seeds, steps, progress and cancel, out-of-memory.
"""
