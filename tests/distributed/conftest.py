"""Distributed: several gloo/CPU processes, the way torchrun runs a job.

Save on N ranks and load on M (plain tensors, 1-D/2-D DTensors), hangs that must end as
timeouts naming the absent rank, training state resumed on other world sizes, the
Lightning plugin and strategies, launch/train.py under torchrun, and the documentation's
snippets (README and the guides, on one process and on 2 ranks: ``test_docs.py``). Ranks
start through ``support/distributed.py`` (``run_ranks``, ``run_command``): each run has a
deadline, after which its process groups are killed and the test fails with every rank's
output.
"""
