"""Local training and the ClientWorker.

`spec.py` holds what the driver hands a worker (torch-free), `trainer.py` the one local-training
loop and the torch backend, `context.py` what a strategy changes about local training (FedProx,
SCAFFOLD, rank masks), `deepspeed_trainer.py` the DeepSpeed backend, `worker.py` the ClientWorker
that builds the model once and trains client after client. `trainer.BACKENDS` maps
`client.backend` to its trainer class. Nothing is imported here, so that the driver can import
`spec` without torch.
"""
