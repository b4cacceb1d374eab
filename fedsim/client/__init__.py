"""Local trainers and the ClientWorker actor.

`TRAINERS` (in `trainer.py`) maps `client.backend` to its trainer class; backends in modules of
their own register here, so the registry is complete whichever module is imported first.
"""

from fedsim.client.deepspeed_trainer import DeepSpeedTrainer
from fedsim.client.trainer import TRAINERS

TRAINERS.setdefault("deepspeed", DeepSpeedTrainer)
