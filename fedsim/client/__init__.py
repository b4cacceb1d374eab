"""Local training and the ClientWorker actor.

`trainer.py` holds the one local-training loop and the torch backend, `context.py` what a
strategy changes about local training (FedProx, SCAFFOLD, rank masks), `deepspeed_trainer.py`
the DeepSpeed backend. `TRAINERS` (in `trainer.py`) maps `client.backend` to its trainer class;
backends in modules of their own register here, so the registry is complete whichever module is
imported first.
"""

from fedsim.client.deepspeed_trainer import DeepSpeedTrainer
from fedsim.client.trainer import TRAINERS

TRAINERS.setdefault("deepspeed", DeepSpeedTrainer)
