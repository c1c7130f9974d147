"""Triton's autotuner cut short: for short jobs on a machine whose autotune cache is cold.

FLA autotunes each kernel per shape; on a fresh GPU machine its GLA backward alone compiles and times
dozens of configs, minutes before the first step (and longer when several processes tune at once, each
timing under the others' load). Every config of an autotuned kernel computes the same result, only at
another speed, so a job whose time goes elsewhere (a small model's matmuls, a test of correctness) loses
little by taking the first config that compiles and runs. Opt-in and process-wide: it changes every
`triton.autotune` kernel in the process (Inductor's own tuning is untouched).
"""

from __future__ import annotations

__all__ = ["stop_autotuning_at_first_working_config"]


def stop_autotuning_at_first_working_config() -> bool:
    """From now on each Triton autotune round stops at its first config that compiles and runs (a config
    that does not fit, timed as inf, is skipped). Idempotent; returns False where Triton is missing."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return False
    if getattr(Autotuner, "_swaa_first_config", False):
        return True
    prune, bench = Autotuner.prune_configs, Autotuner._bench

    def prune_configs(self, *args, **kwargs):
        self._swaa_found = False  # a new autotune round: one key, one sweep over these configs
        return prune(self, *args, **kwargs)

    def _bench(self, *args, **kwargs):
        if getattr(self, "_swaa_found", False):
            return [float("inf")] * 3  # never compiled, never picked
        timing = bench(self, *args, **kwargs)
        self._swaa_found = all(t != float("inf") for t in timing)
        return timing

    Autotuner.prune_configs, Autotuner._bench = prune_configs, _bench
    Autotuner._swaa_first_config = True
    return True
