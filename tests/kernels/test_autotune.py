"""swaa.kernels.autotune against a stand-in for Triton's Autotuner (CPU machines have no Triton)."""

import sys
import types

from swaa.kernels.autotune import stop_autotuning_at_first_working_config


def test_each_round_times_configs_only_until_the_first_that_runs(monkeypatch):
    class Autotuner:
        def prune_configs(self, kwargs):
            return list(self.configs)

        def _bench(self, config):
            self.timed.append(config)
            return [float("inf")] * 3 if config == "too-big" else [1.0, 1.0, 1.0]

        def run(self):  # one round, as Triton's autotuner does: prune, then time each remaining config
            timings = {c: self._bench(c) for c in self.prune_configs({})}
            return min(timings, key=lambda c: timings[c])

    module = types.ModuleType("triton.runtime.autotuner")
    module.Autotuner = Autotuner
    for name, mod in (("triton", types.ModuleType("triton")), ("triton.runtime", types.ModuleType("r"))):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "triton.runtime.autotuner", module)

    assert stop_autotuning_at_first_working_config() and stop_autotuning_at_first_working_config()
    tuner = Autotuner()
    tuner.configs, tuner.timed = ["too-big", "a", "b", "c"], []
    assert tuner.run() == "a"  # a config that does not fit is skipped, the next that runs is taken
    assert tuner.timed == ["too-big", "a"]
    tuner.timed = []
    assert tuner.run() == "a" and tuner.timed == ["too-big", "a"]  # a new round (another key) times again


def test_without_triton_it_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    assert stop_autotuning_at_first_working_config() is False
