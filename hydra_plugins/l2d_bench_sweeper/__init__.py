"""The grid sweeper of l2d-bench: Hydra's basic sweeper (a grid over the sweep parameters,
``hydra/sweeper=basic``, which this one replaces) composing only the first job of each
batch to check it, not every job twice.

The basic sweeper composes every job's config once to validate the batch and the launcher
composes it again to run it; on the 396-cell default grid the check alone cost about a
minute. Every job of a grid has the same keys and only their values differ, so checking
the batch's first job still stops a mistyped override before anything runs.
"""

from dataclasses import dataclass
from typing import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore


class CellSweeper(BasicSweeper):
    """``BasicSweeper`` whose batch check composes one job instead of all of them."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        super().validate_batch_is_legal(batch[:1])


@dataclass
class CellSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.l2d_bench_sweeper.CellSweeper"


# under the basic sweeper's name: every grid uses it, and experiments that pick another
# sweeper (experiment=tune: optuna) still do
ConfigStore.instance().store(group="hydra/sweeper", name="basic", node=CellSweeperConf,
                             provider="l2d-bench")
