"""The GPU consumer (issue 30): jobs of local models wait in a room, and one
scheduler thread per device takes them out a call at a time.

- ``turns.py``: which jobs the next call takes (pure): interactive jobs before
  batch lines, projects taking turns, companions that share the head job's plan
  up to the model's ``max_batch_images``.
- ``room.py``: the waiting room and its scheduler: a job stays ``queued`` while it
  waits; the scheduler claims a call's jobs, runs the one pipeline call for them
  (shared/providers/local/diffusion.py) and hands each job its images.
- ``consumer.py``: the Celery task's side: a message's jobs enter the room, and
  each job's images are stored and recorded on the task's thread, while the device
  runs the next call.
"""
