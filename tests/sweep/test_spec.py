"""Sweep specs: the shipped tune_configs, every kind of bad sweep file, and the Ray Tune space."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ray import cloudpickle, tune
from ray.tune.search.sample import Categorical, Float, Integer
from ray.tune.search.variant_generator import generate_variants

from e2e_dist.data.text import plan_splits, stdlib_files
from e2e_dist.errors import ConfigError
from e2e_dist.models.gpt import ByteGPT
from e2e_dist.sweep.spec import POINT_KEY, flatten_params, load_sweep

ROOT = Path(__file__).resolve().parents[2]
TUNE = ROOT / "tune_configs"
SHIPPED = {"arch_sweep": 12, "data_ablation": 6, "scaling_grid": 12}


def tokens_seen(cfg) -> int:
    t = cfg.trainer
    return t.max_steps * t.micro_batch_size * t.grad_accum * t.num_workers * cfg.data.seq_len


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name,count", SHIPPED.items())
def test_shipped_files_validate_and_expand(name: str, count: int) -> None:
    spec = load_sweep(TUNE / f"{name}.yaml")
    trials = spec.trial_configs()
    assert len(trials) == count == spec.num_trials()
    names = [cfg.name for _, cfg in trials]
    assert len(set(names)) == count
    for i, (params, cfg) in enumerate(trials):
        assert re.fullmatch(rf"{spec.name}-t{i:03d}-[0-9a-f]{{6}}", cfg.name)
        assert cfg.tracking.group == spec.name
        assert cfg.storage.path == spec.sweep_uri and cfg.run_uri.startswith(spec.sweep_uri + "/")
        assert cfg.model.kind == "gpt" and cfg.data.source == "stdlib-text"
        for key, value in params.items():  # the swept values really are in the trial's config
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value
        assert cfg.trainer.num_workers == 1  # resources_per_trial fit a 2-CPU machine
    assert spec.results_uri == spec.sweep_uri + "/results.jsonl"


def test_shipped_arch_sweep_uses_asha() -> None:
    arch = load_sweep(TUNE / "arch_sweep.yaml")
    assert arch.scheduler.type == "asha" and arch.scheduler.grace_period <= arch.scheduler.max_t
    combos = {(c.model.n_layer, c.model.d_model, c.model.n_head) for _, c in arch.trial_configs()}
    assert len(combos) == SHIPPED["arch_sweep"]


def test_shipped_data_ablation_varies_only_the_unique_data() -> None:
    """Same model and compute for every trial; D doubles; the subsets hold their byte budgets; the
    sweep's metric is the best evaluation (small subsets overfit before the last step)."""
    abl = load_sweep(TUNE / "data_ablation.yaml")
    assert abl.metric == "val_loss_best" and abl.mode == "min"
    cfgs = sorted((c for _, c in abl.trial_configs()), key=lambda c: c.data.max_bytes)
    assert len({c.model.model_dump_json() for c in cfgs}) == 1  # one architecture
    assert len({tokens_seen(c) for c in cfgs}) == 1  # one compute budget
    sizes = [c.data.max_bytes for c in cfgs]
    assert all(b == 2 * a for a, b in zip(sizes, sizes[1:]))
    files = stdlib_files()
    subset = [plan_splits(files, c.data, "stdlib")[0] for c in cfgs]
    tokens = [p.windows * p.seq_len for p in subset]
    assert all(abs(tok / size - 1) < 0.05 for tok, size in zip(tokens, sizes))  # the whole byte budget is there
    assert tokens_seen(cfgs[0]) >= tokens[-1]  # even the largest subset is read whole
    assert all(c.trainer.eval_every < c.trainer.max_steps for c in cfgs)  # a best to keep, not just the last


def test_scaling_grid_is_an_isoflop_design() -> None:
    """Several model sizes at each of three compute budgets (C = 6 N D within 5%), no token read twice."""
    spec = load_sweep(TUNE / "scaling_grid.yaml")
    budgets: dict[float, set[int]] = {3e10: set(), 1e11: set(), 3e11: set()}
    train = None
    for _, cfg in spec.trial_configs():
        m = cfg.model
        n = ByteGPT(m.n_layer, m.n_head, m.d_model, m.max_seq_len).num_params(non_embedding=True)
        d = tokens_seen(cfg)
        near = [b for b in budgets if abs(6 * n * d / b - 1) < 0.05]
        assert near, f"{cfg.name}: C = {6 * n * d:.3g} is not within 5% of a budget"
        budgets[near[0]].add(n)
        train = train or plan_splits(stdlib_files(), cfg.data, "stdlib")[0]
        assert d <= train.windows * train.seq_len  # no token is seen twice: D counts distinct data
    assert all(len(sizes) >= 4 for sizes in budgets.values()), budgets


def test_set_overrides_reach_every_trial() -> None:
    spec = load_sweep(TUNE / "arch_sweep.yaml", ["trainer.max_steps=3", "base.data.max_bytes=20000",
                                                  "max_concurrent_trials=1", "scheduler.max_t=3",
                                                  "scheduler.grace_period=1", "storage.path=/tmp/x",
                                                  "search_space.model.n_layer={grid: [1]}"])
    trials = spec.trial_configs()
    assert len(trials) == 4 and spec.max_concurrent_trials == 1
    assert all(c.trainer.max_steps == 3 and c.data.max_bytes == 20000 and c.model.n_layer == 1 for _, c in trials)
    assert trials[0][1].run_uri.startswith("/tmp/x/arch-sweep/")
    assert load_sweep(TUNE / "arch_sweep.yaml", ["overrides.trainer.lr=0.02"]).trial_configs()[0][1].trainer.lr == 0.02


def test_spec_travels_to_ray_workers() -> None:
    """The Tuner ships the spec to each trial's driver: it must survive Ray's pickling intact."""
    spec = load_sweep(TUNE / "scaling_grid.yaml")
    copy = cloudpickle.loads(cloudpickle.dumps(spec))
    assert [c.name for _, c in copy.trial_configs()] == [c.name for _, c in spec.trial_configs()]


def test_tune_param_space_matches_trial_configs() -> None:
    """Ray's own variant generator expands our param space to exactly our trials (same names)."""
    for name in ("arch_sweep", "scaling_grid"):
        spec = load_sweep(TUNE / f"{name}.yaml")
        variants = [cfg for _, cfg in generate_variants(spec.tune_param_space())]
        assert sorted(spec.run_config_for(v).name for v in variants) == sorted(c.name for _, c in spec.trial_configs())
    assert POINT_KEY in spec.tune_param_space()


def test_random_space_domains_and_samples(tmp_path: Path) -> None:
    p = write(tmp_path, """
name: rnd
base: tiny-text
search: random
num_samples: 4
seed: 3
search_space:
  trainer.lr: {loguniform: [1.0e-4, 1.0e-2]}
  trainer.weight_decay: {uniform: [0.0, 0.2]}
  model.n_layer: {randint: [1, 4]}
  model.n_head: {choice: [2, 4]}
  data.fraction: {grid: [0.5, 1.0]}
""")
    spec = load_sweep(p)
    space = spec.tune_param_space()
    assert isinstance(space["trainer.lr"], Float) and space["trainer.lr"].lower == 1e-4
    assert isinstance(space["model.n_layer"], Integer) and (space["model.n_layer"].lower, space["model.n_layer"].upper) == (1, 4)
    assert isinstance(space["model.n_head"], Categorical) and space["model.n_head"].categories == [2, 4]
    assert space["data.fraction"] == tune.grid_search([0.5, 1.0])
    params = spec.trial_params()
    assert len(params) == 8 == spec.num_trials() and params == spec.trial_params()  # seeded
    assert all(1e-4 <= p["trainer.lr"] < 1e-2 and 1 <= p["model.n_layer"] < 4 for p in params)
    with pytest.raises(ValueError, match="trial index"):
        spec.run_config_for(params[0])
    assert spec.run_config_for(params[5], index=5).name.startswith("rnd-t005-")


def test_random_preview_is_what_the_tuner_draws(tmp_path: Path) -> None:
    """The preview of a random sweep is the Tuner's own trials: the search algorithm the runner
    builds (BasicVariantGenerator, random_state=seed), in Tune's trial-counter order."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = load_sweep(write(tmp_path, """
name: rnd
base: tiny-text
search: random
num_samples: 3
seed: 7
search_space:
  trainer.lr: {loguniform: [1.0e-4, 1.0e-2]}
  data.fraction: {grid: [0.5, 1.0]}
  model.n_head: {choice: [2, 4]}
points: [{trainer.seed: 1}, {trainer.seed: 2}]
"""))
    gen = BasicVariantGenerator(random_state=spec.seed)
    gen.add_configurations({"rnd": {"run": lambda config: None, "config": spec.tune_param_space(),
                                    "num_samples": spec.num_samples, "storage_path": str(tmp_path / "tune")}})
    tuner_trials = []
    while (trial := gen.next_trial()) is not None:
        tuner_trials.append((int(trial.trial_id.rsplit("_", 1)[-1]), flatten_params(trial.config)))
    assert tuner_trials == list(enumerate(spec.trial_params())) and len(tuner_trials) == 12


def test_run_config_for_tune_config_and_base_forms(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    write(tmp_path, "include: tiny-text\ntrainer: {max_steps: 7}\n", "base.yaml")
    from_path = load_sweep(write(tmp_path, "name: s\nbase: base.yaml\npoints: [{model.d_model: 64}, {model.d_model: 32}]\n"))
    inline = load_sweep(write(tmp_path, "name: s\nbase: {include: base.yaml, trainer: {lr: 0.01}}\n"
                                        "points: [{model.d_model: 64}, {model.d_model: 32}]\n", "b.yaml"))
    cfg = from_path.run_config_for({POINT_KEY: {"model.d_model": 32}})
    assert cfg.name == from_path.trial_configs()[1][1].name and cfg.trainer.max_steps == 7
    assert inline.trial_configs()[0][1].trainer.lr == 0.01 and inline.trial_configs()[0][1].trainer.max_steps == 7
    assert flatten_params({"a": 1, POINT_KEY: {"b": 2}}) == {"a": 1, "b": 2}
    with pytest.raises(ConfigError, match="model.d_model=48 is not a point"):
        from_path.run_config_for({"model.d_model": 48})
    with pytest.raises(ConfigError, match="model.n_layer is not a parameter"):
        from_path.run_config_for({"model.n_layer": 2, "model.d_model": 64})


BASE = "name: bad\nbase: tiny-text\n"
BAD = {
    "unknown field": (BASE + "search_space: {model.n_layer: {grid: [1]}}\nbogus: 1\n", "bogus: unknown field"),
    "empty grid": (BASE + "search_space: {model.n_layer: {grid: []}}\n", "search_space.model.n_layer: empty grid"),
    "unknown key": (BASE + "search_space: {model.n_layr: {grid: [1]}}\n", "model.n_layr: unknown run-config key"),
    "key below a leaf": (BASE + "search_space: {data.fraction.x: {grid: [1]}}\n", "data.fraction.x: unknown run-config key"),
    "heads vs width": (BASE + "search_space: {model.n_head: {grid: [4, 3]}}\n", "n_head=3 does not divide d_model=128"),
    "heads vs width in points": (BASE + "points: [{model.d_model: 64, model.n_head: 2}, {model.d_model: 30, model.n_head: 4}]\n",
                                 "[model.d_model=30 model.n_head=4]: model: n_head=4 does not divide d_model=30"),
    "heads vs width in randint": (BASE + "search: random\nsearch_space: {model.n_head: {randint: [1, 5]}}\n",
                                  "n_head=3 does not divide"),
    "bad value": (BASE + "search_space: {data.fraction: {grid: [0.5, 2]}}\n", "data.fraction: Input should be less than or equal to 1"),
    "not a domain": (BASE + "search_space: {trainer.lr: [0.1, 0.2]}\n", "search_space.trainer.lr: expected a domain"),
    "unknown domain": (BASE + "search_space: {trainer.lr: {grdi: [1]}}\n", "search_space.trainer.lr.grdi: unknown field"),
    "two domains": (BASE + "search_space: {trainer.lr: {grid: [1], choice: [2]}}\n", "exactly one of"),
    "reversed range": (BASE + "search: random\nsearch_space: {trainer.lr: {uniform: [1, 0.1]}}\n", "uniform: needs lo < hi"),
    "loguniform at 0": (BASE + "search: random\nsearch_space: {trainer.lr: {loguniform: [0, 0.1]}}\n", "needs 0 < lo"),
    "sampled in grid": (BASE + "search_space: {trainer.lr: {uniform: [0.1, 1]}}\n", "trainer.lr: uniform needs search: random"),
    "repeats of a grid": (BASE + "num_samples: 2\nsearch_space: {trainer.lr: {grid: [0.1]}}\n", "num_samples: must be 1"),
    "asha without max_t": (BASE + "scheduler: {type: asha}\nsearch_space: {trainer.lr: {grid: [0.1]}}\n", "scheduler: asha needs max_t"),
    "grace over max_t": (BASE + "scheduler: {type: asha, max_t: 2, grace_period: 3}\nsearch_space: {trainer.lr: {grid: [0.1]}}\n",
                         "grace_period=3 > max_t=2"),
    "points keys differ": (BASE + "points: [{model.d_model: 64}, {model.n_layer: 2}]\n", "points[1] has keys"),
    "duplicate point": (BASE + "points: [{model.d_model: 64}, {model.d_model: 64}]\n", "points[1] repeats"),
    "point and space overlap": (BASE + "search_space: {model.d_model: {grid: [64]}}\npoints: [{model.d_model: 64}]\n",
                                "model.d_model is in both"),
    "reserved key": (BASE + "search_space: {name: {grid: [a]}}\n", "'name' cannot be set by a sweep"),
    "nothing to sweep": (BASE, "nothing to sweep"),
    "missing base": ("name: bad\nsearch_space: {trainer.lr: {grid: [0.1]}}\n", "base: Field required"),
    "base not found": ("name: bad\nbase: nope.yaml\nsearch_space: {trainer.lr: {grid: [0.1]}}\n", "base: config file not found"),
    "bad override": (BASE + "overrides: {trainer.max_stepz: 3}\nsearch_space: {trainer.lr: {grid: [0.1]}}\n",
                     "overrides.trainer.max_stepz: unknown field"),
    "unknown model key override": (BASE + "overrides: {model.n_layers: 3}\nsearch_space: {trainer.lr: {grid: [0.1]}}\n",
                                   "overrides.model.n_layers: unknown field"),
    "unknown section override": (BASE + "overrides: {trainer.optim.lr: 3}\nsearch_space: {trainer.lr: {grid: [0.1]}}\n",
                                 "overrides.trainer.optim.lr: unknown field (trainer.optim)"),
    "bad override value": (BASE + "overrides: {data.fraction: 2}\nsearch_space: {trainer.lr: {grid: [0.1]}}\n",
                           "overrides.data.fraction: Input should be less than or equal to 1"),
    "override below a leaf": (BASE + "overrides: {trainer.max_steps.x: 3}\nsearch_space: {trainer.lr: {grid: [0.1]}}\n",
                              "overrides: trainer.max_steps.x: max_steps is not a section"),
    "bad name": ("name: bad name\nbase: tiny-text\nsearch_space: {trainer.lr: {grid: [0.1]}}\n", "name: 'bad name' must be"),
    "bad yaml": ("name: [\n", "is not valid YAML"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_sweep_file_is_one_clear_line(tmp_path: Path, case: str) -> None:
    text, expected = BAD[case]
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_sweep(p)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg and msg.startswith(str(p)), msg


def test_bad_set_and_missing_file(tmp_path: Path) -> None:
    p = write(tmp_path, BASE + "search_space: {trainer.lr: {grid: [0.1]}}\n")
    with pytest.raises(ConfigError, match="'optimizer' is neither a sweep field nor a run-config section"):
        load_sweep(p, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_sweep(p, ["trainer.max_steps"])
    with pytest.raises(ConfigError, match="n_head=3 does not divide"):
        load_sweep(p, ["model.n_head=3"])
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep(tmp_path / "nope.yaml")


def test_unknown_override_key_names_overrides_not_base(tmp_path: Path) -> None:
    p = write(tmp_path, BASE + "overrides: {model.n_layers: 3}\nsearch_space: {trainer.lr: {grid: [0.1]}}\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(p)
    assert str(err.value) == f"{p}: overrides.model.n_layers: unknown field", err.value
    with pytest.raises(ConfigError, match=r"overrides\.trainer\.max_stepz: unknown field"):
        load_sweep(write(tmp_path, BASE + "search_space: {trainer.lr: {grid: [0.1]}}\n"), ["trainer.max_stepz=3"])


def test_huge_space_is_refused(tmp_path: Path) -> None:
    grid = list(range(1, 200))
    p = write(tmp_path, BASE + f"search_space: {{trainer.max_steps: {{grid: {grid}}}, trainer.seed: {{grid: {grid}}}}}\n")
    with pytest.raises(ConfigError, match="combinations to validate"):
        load_sweep(p)
