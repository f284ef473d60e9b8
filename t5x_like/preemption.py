"""Stopping on a preemption notice: clusters and TPU pods send SIGTERM some seconds before they
take the machines back. Training notes it, saves the step it reached, and stops with Preempted;
rerunning the same command resumes there instead of at the last periodic checkpoint.
"""

from __future__ import annotations

import signal

# The exit status of a process that SIGTERM ended (128 + 15), which schedulers read as preempted.
EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):
  """Training stopped on SIGTERM after saving the step it reached."""


class StopSignal:
  """A context in which SIGTERM sets `received` rather than ending the process. Outside the main
  thread, where Python cannot take signals, it listens to nothing and SIGTERM acts as before."""

  def __init__(self):
    self.received = False
    self._installed = False
    self._previous = None

  def __enter__(self) -> "StopSignal":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._note)
      self._installed = True
    except ValueError:  # not the main thread
      pass
    return self

  def _note(self, signum, frame) -> None:
    self.received = True

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
