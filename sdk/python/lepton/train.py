"""Training steps on host-held models through ``lepton:nn/training``.

The manifest declares the trainer (``[trainer.digits]``) and grants it
(``trainers = ["digits"]``)::

    trainer = train.Trainer.open("digits")
    loss = trainer.step({"x": nn.Tensor.from_f32([32, 64], xs)}, nn.Tensor.from_i64([32], ys))
"""

from __future__ import annotations

from typing import Mapping

from componentize_py_types import Err
from wit_world.imports import training

from .nn import Tensor, _error


class Trainer:
    """A trainer the host runs (shared by every request of the app)."""

    def __init__(self, trainer: training.Trainer) -> None:
        self._trainer = trainer

    @classmethod
    def open(cls, name: str) -> "Trainer":
        try:
            return cls(training.open(name))
        except Err as err:
            raise _error(err) from None

    def step(self, inputs: Mapping[str, Tensor], targets: Tensor) -> float:
        """One optimizer step on a batch; the loss before the step."""
        try:
            return self._trainer.step([(n, t._wit()) for n, t in inputs.items()], targets._wit())
        except Err as err:
            raise _error(err) from None

    def evaluate(self, inputs: Mapping[str, Tensor], targets: Tensor) -> float:
        """The loss on a batch, without a step."""
        try:
            return self._trainer.evaluate([(n, t._wit()) for n, t in inputs.items()], targets._wit())
        except Err as err:
            raise _error(err) from None

    def steps(self) -> int:
        """Steps taken so far."""
        return self._trainer.steps()

    def publish(self, model: str) -> None:
        """Makes the current weights serve as the app's model `model`."""
        try:
            self._trainer.publish(model)
        except Err as err:
            raise _error(err) from None

    def checkpoint(self) -> None:
        """Writes a checkpoint now."""
        try:
            self._trainer.checkpoint()
        except Err as err:
            raise _error(err) from None
