"""Configuration: every field with its default, and validation before any compilation.

Config files in ``configs/`` start from :func:`base_config` and change what they need;
``python -m sams_jax.train --config configs/x.py --config.<field>=<value>`` overrides
single fields (an unknown field is an error naming the closest known field, or the known
fields of its section: :func:`unknown_field_message`); so is a field a config file sets
that :func:`base_config` does not have (a misspelling would otherwise be ignored).
"""

from __future__ import annotations

import math
import numbers

import os

import ml_collections

from sams_jax.data import DATA_SOURCES, NORMALIZATIONS
from sams_jax.data.anndata_io import CONTROL_MATCHES, ENCODINGS
from sams_jax.data.simulation import OBSERVATIONS
from sams_jax.data.splits import TASKS
from sams_jax.likelihoods import LIKELIHOODS
from sams_jax.models import GUIDES, MODELS
from sams_jax.nn import COMPUTE_DTYPES
from sams_jax.objective import OBJECTIVES, ObjectiveConfig
from sams_jax.streaming import resolve_placement

DATA_PLACEMENTS = ("auto", "device", "host")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the allowed values."""


def flat_fields(tree: dict, prefix: str = "") -> dict:
    """``{"section.field": value}`` of a nested config dict (e.g. a config's JSON), in its order."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def base_config() -> ml_collections.ConfigDict:
    """All fields, at the defaults of the paper's code (SPEC 1-3, 5)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # model initialisation, particles and mini-batch order

    config.data = ml_collections.ConfigDict()
    config.data.source = "simulation"
    # simulation (SPEC 6)
    config.data.n_latent = 15
    config.data.n_perturbations = 100
    config.data.n_genes = 100
    config.data.mask_prob = 2 / 15
    config.data.exponentiate = False
    config.data.noise_fraction = 0.2
    config.data.cells_per_perturbation = (500, 100, 100)  # train, val, test
    config.data.observation = "normal"  # or "library_nb" (counts)
    config.data.seed = 0
    # AnnData (source "anndata"; sams_jax.data.anndata_io.from_anndata). "" means unset.
    config.data.path = ""  # .h5ad file
    config.data.perturbation_key = "perturbation"  # obs column naming each cell's condition
    config.data.control = "control"  # control label (all-zero dosage); "" = no control cells
    config.data.control_match = "exact"  # or "contains": every label containing `control` is control
    config.data.delimiter = "+"  # combinations "A+B"; "" = every label is one perturbation
    config.data.guide_column_pattern = ""  # "guide_": 0/1 obs indicator columns (curated Norman file)
    config.data.counts_layer = "counts"  # raw counts layer; "" = X
    config.data.split_key = ""  # obs column with train / val / test; "" = the task's split
    config.data.library_size_key = ""  # obs column; "" = row sums of the counts
    config.data.gene_symbols_key = ""  # var column of display names carried to the outputs; "" = var_names
    config.data.encode_combinations = "additive"  # or "unique" (a pair is a perturbation of its own)
    config.data.use_highly_variable = False  # keep var["highly_variable"] genes only
    config.data.task = "none"  # split: none / replogle (random 64/16/20), norman_ood, norman_data_efficiency
    config.data.frac_combinations_train = 1.0  # norman_ood: fraction of pairs in train / val
    config.data.frac_combinations_test = 0.25  # norman_ood: fraction of pairs in test
    config.data.frac_combination_cells_train = 1.0  # norman_data_efficiency: fraction of training pair cells
    config.data.split_seed = 0
    config.data.backed = False  # leave the counts in the .h5ad and read cells on demand (files larger than memory)

    config.model = ml_collections.ConfigDict()
    # sams_vae, or a baseline (SPEC 4): cpa_vae, conditional_vae, svae_plus, sams_vae_beta_bernoulli.
    # A model reads the fields it uses (sams_jax.models.model_fields) and ignores the others.
    config.model.name = "sams_vae"
    config.model.n_latent = 15
    config.model.likelihood = "normal"
    config.model.guide = "correlated"
    config.model.mean_field_encoder = False
    config.model.normalization = "log_standardize"
    config.model.decoder_n_layers = 1
    config.model.decoder_n_hidden = 400
    config.model.basal_encoder_n_layers = 1
    config.model.basal_encoder_n_hidden = 400
    config.model.embedding_encoder_n_layers = 2
    config.model.embedding_encoder_n_hidden = 200
    config.model.mask_prior_prob = 0.01
    config.model.embedding_prior_scale = 1.0
    config.model.mask_init_logits = 0.0
    config.model.gs_temperature = 1.0
    config.model.embedding_loc_init_scale = 0.0
    # Beta(a, b) prior on mask probabilities (svae_plus, sams_vae_beta_bernoulli); SVAE+ paper runs: Beta(1, 2)
    config.model.mask_beta_a = 1.0
    config.model.mask_beta_b = 2.0
    # dtype of the matrix-multiply inputs of the encoder / decoder / embedding networks: "float32"
    # (the paper's) or "bfloat16" (float32 parameters, accumulation and everything downstream)
    config.model.compute_dtype = "float32"

    config.objective = ml_collections.ConfigDict()
    config.objective.kind = "elbo"  # or "iwelbo"
    config.objective.n_particles = 5
    # "name=multiplier,..." on (log p - log q) of named variables, e.g. "mask=0.5"
    config.objective.variable_weights = ""
    # "name,...": plated variables counted once per cell that received t (extra weight N_t)
    config.objective.per_cell_variables = ""
    # "name,...": variables whose log p - log q is replaced by the closed-form -KL(q || p)
    # (e.g. "mask,embedding,z_basal"; elbo only). Default "": the paper's sampled estimator.
    config.objective.analytic_kl = ""
    # annealed multipliers: training starts at these ("mask=500") and reaches
    # variable_weights after weight_anneal_steps steps (geometric interpolation); "" = off
    config.objective.initial_variable_weights = ""
    config.objective.weight_anneal_steps = 0

    config.train = ml_collections.ConfigDict()
    config.train.learning_rate = 3e-4
    config.train.weight_decay = 1e-6  # PyTorch-style L2 added to the gradient
    config.train.grad_clip_norm = 0.0  # global-norm clipping; 0 = off
    config.train.mask_learning_rate = 0.0  # Adam learning rate of the mask logits; 0 = learning_rate
    config.train.batch_size = 512
    config.train.max_steps = 20_000
    config.train.eval_every = 1_000  # validation loss, history row and checkpoint
    config.train.steps_per_dispatch = 100  # training steps per jitted lax.scan call
    config.train.eval_batch_size = 2_048  # cells per chunk of the validation loss (the final IWELBO: iwelbo_chunk_size)
    config.train.progress = True  # a tqdm bar on a terminal; one line per evaluation when stderr is not one
    config.train.num_devices = 0  # data-parallel devices per process; 0 = all local devices
    # shards of the training cells (sams_jax.distributed); 0 = one per process. A multiple of the
    # number of processes; fixing it gives the same mini-batches on any process count dividing it
    config.train.data_shards = 0
    # several processes (hosts), see README "Multiple hosts"; unset (""/0/-1) = one process, unless
    # SAMS_JAX_DISTRIBUTED=1 asks jax.distributed.initialize to read the cluster environment (SLURM, ...)
    config.train.distributed = ml_collections.ConfigDict()
    config.train.distributed.coordinator_address = ""  # "host:port" of process 0, the same for all
    config.train.distributed.num_processes = 0
    config.train.distributed.process_id = -1
    config.train.distributed.local_device_ids = ""  # "0,1": devices this process uses; "" = all / auto
    config.train.distributed.initialization_timeout = 300  # seconds to wait for all processes
    # where the training cells live: "device" (dense on the device, batches gathered there), "host" (x stays
    # on the host, dense / CSR / backed; each dispatch's batches are densified by a prefetch thread), or
    # "auto": device when the dense training split fits sams_jax.streaming.AUTO_DEVICE_MAX_BYTES and x is not backed
    config.train.data_placement = "auto"
    config.train.prefetch = 2  # host placement: dispatches prepared ahead of the device

    config.eval = ml_collections.ConfigDict()
    config.eval.iwelbo_n_particles = 100
    return config


def _check_choice(config, path: str, allowed):
    value = config
    for key in path.split("."):
        value = value[key]
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; choose one of {sorted(allowed)}")


def _check_number(config, path: str, low=None, high=None, integer=False, low_open=False):
    value = config
    for key in path.split("."):
        value = value[key]
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{path}={value!r} must be {kind}" + ("" if integer else " (finite)"))
    if integer and int(value) != value:
        raise ConfigError(f"{path}={value!r} must be {kind}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and value > high
    if bad_low or bad_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bracket = "(" if low_open else "["
        raise ConfigError(f"{path}={value!r} is out of range; it must be {kind} in {bracket}{lo}, {hi}]")


def unknown_fields(config) -> list[str]:
    """The fields of ``config`` (``"model.likelihod"``) that :func:`base_config` does not
    have: misspellings in a config file, which nothing would read."""
    def names(node, prefix: str = "") -> list[str]:
        found = []
        for key in node.keys():
            value = node[key]
            found += names(value, f"{prefix}{key}.") if isinstance(value, ml_collections.ConfigDict) else \
                [f"{prefix}{key}"]
        return found

    known = set(names(base_config()))
    return [name for name in names(config) if name not in known]


def validate_config(config) -> None:
    """Check every field that does not need the data; raise :class:`ConfigError`."""
    unknown = unknown_fields(config)
    if unknown:
        messages = [unknown_field_message(base_config(), field, flag="") for field in unknown[:5]]
        raise ConfigError(f"{'; '.join(messages)}{' ...' if len(unknown) > 5 else ''} (the config sets fields "
                          "that sams_jax does not have, so nothing would read them; every field and its default: "
                          "sams_jax.config.base_config())")
    _check_number(config, "seed", 0, integer=True)
    _check_choice(config, "data.source", DATA_SOURCES)
    if config.data.source == "simulation":
        _check_choice(config, "data.observation", OBSERVATIONS)
        for field in ("n_latent", "n_perturbations", "n_genes"):
            _check_number(config, f"data.{field}", 1, integer=True)
        _check_number(config, "data.mask_prob", 0.0, 1.0)
        if len(config.data.cells_per_perturbation) != 3 or min(config.data.cells_per_perturbation) < 1:
            raise ConfigError("data.cells_per_perturbation must be three positive integers (train, val, test); "
                              f"got {config.data.cells_per_perturbation!r}")
    if config.data.source == "anndata":
        _check_choice(config, "data.task", TASKS)
        _check_choice(config, "data.encode_combinations", ENCODINGS)
        _check_choice(config, "data.control_match", CONTROL_MATCHES)
        _check_number(config, "data.split_seed", 0, integer=True)
        for field in ("frac_combinations_train", "frac_combination_cells_train"):
            _check_number(config, f"data.{field}", 0.0, 1.0)
        _check_number(config, "data.frac_combinations_test", 0.0, 1.0, low_open=True)
        if config.data.split_key and config.data.task != "none":
            raise ConfigError(f"data.split_key={config.data.split_key!r} and data.task={config.data.task!r} both "
                              "define the splits; keep one (--config.data.split_key='' or --config.data.task=none)")
    _check_choice(config, "model.name", MODELS)
    _check_choice(config, "model.likelihood", LIKELIHOODS)
    _check_choice(config, "model.guide", GUIDES)
    _check_choice(config, "model.normalization", NORMALIZATIONS)
    if config.model.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"model.compute_dtype={config.model.compute_dtype!r} is not allowed; choose one of "
                          f"{list(COMPUTE_DTYPES)} (bfloat16: matrix-multiply inputs of the networks in bfloat16, "
                          "parameters and the objective in float32)")
    for prefix in ("decoder", "basal_encoder", "embedding_encoder"):
        _check_number(config, f"model.{prefix}_n_layers", 1, integer=True)
        _check_number(config, f"model.{prefix}_n_hidden", 1, integer=True)
    _check_number(config, "model.n_latent", 1, integer=True)
    _check_number(config, "model.mask_prior_prob", 0.0, 1.0, low_open=True)
    if config.model.mask_prior_prob >= 1.0:
        raise ConfigError(f"model.mask_prior_prob={config.model.mask_prior_prob!r} must be below 1")
    _check_number(config, "model.embedding_prior_scale", 0.0, low_open=True)
    _check_number(config, "model.gs_temperature", 0.0, low_open=True)
    _check_number(config, "model.embedding_loc_init_scale", 0.0)
    _check_number(config, "model.mask_init_logits")
    _check_number(config, "model.mask_beta_a", 0.0, low_open=True)
    _check_number(config, "model.mask_beta_b", 0.0, low_open=True)
    if config.model.name == "cpa_vae" and config.model.guide != "mean_field":
        raise ConfigError(f"model.guide={config.model.guide!r} is not allowed with model.name='cpa_vae', whose "
                          "q(embedding) is mean-field; set model.guide='mean_field' (configs/cpa_vae_*.py do)")
    _check_choice(config, "objective.kind", OBJECTIVES)
    _check_number(config, "objective.n_particles", 1, integer=True)
    _check_number(config, "objective.weight_anneal_steps", 0, integer=True)
    try:
        ObjectiveConfig.from_config(config.objective)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check_number(config, "train.learning_rate", 0.0, low_open=True)
    _check_number(config, "train.weight_decay", 0.0)
    _check_number(config, "train.grad_clip_norm", 0.0)
    _check_number(config, "train.mask_learning_rate", 0.0)
    _check_number(config, "train.batch_size", 1, integer=True)
    _check_number(config, "train.max_steps", 0, integer=True)
    for field in ("eval_every", "steps_per_dispatch", "eval_batch_size"):
        _check_number(config, f"train.{field}", 1, integer=True)
    _check_choice(config, "train.data_placement", DATA_PLACEMENTS)
    _check_number(config, "train.prefetch", 1, integer=True)
    if not isinstance(config.data.backed, bool):
        raise ConfigError(f"data.backed={config.data.backed!r} must be True or False")
    if config.data.backed and config.data.source != "anndata":
        raise ConfigError("data.backed=True reads an .h5ad file on demand; it needs data.source='anndata'")
    _check_number(config, "eval.iwelbo_n_particles", 1, integer=True)
    _check_number(config, "train.num_devices", 0, integer=True)
    _check_number(config, "train.data_shards", 0, integer=True)
    _check_distributed(config)


def _check_distributed(config) -> None:
    settings = config.train.distributed
    _check_number(config, "train.distributed.num_processes", 0, integer=True)
    _check_number(config, "train.distributed.process_id", -1, integer=True)
    _check_number(config, "train.distributed.initialization_timeout", 1, integer=True)
    ids = str(settings.local_device_ids).replace(" ", "")
    if ids and not all(part.isdigit() for part in ids.split(",")):
        raise ConfigError(f"train.distributed.local_device_ids={settings.local_device_ids!r} must be "
                          "comma-separated device numbers, e.g. '0,1', or '' for all")
    if settings.coordinator_address:
        if settings.coordinator_address.rpartition(":")[2].isdigit() is False:
            raise ConfigError(f"train.distributed.coordinator_address={settings.coordinator_address!r} must be "
                              "'host:port' (process 0's host and a free port), the same for every process")
        if os.environ.get("SAMS_JAX_DISTRIBUTED", "") in ("", "0") and (
                settings.num_processes < 1 or not 0 <= settings.process_id < settings.num_processes):
            raise ConfigError(
                "train.distributed.coordinator_address is set, so train.distributed.num_processes (>= 1) and "
                f"train.distributed.process_id (0 <= id < num_processes) must be too; got num_processes="
                f"{settings.num_processes}, process_id={settings.process_id} (or set SAMS_JAX_DISTRIBUTED=1 to "
                "read them from the cluster environment, e.g. SLURM)")
    elif settings.num_processes > 1 and os.environ.get("SAMS_JAX_DISTRIBUTED", "") in ("", "0"):
        raise ConfigError(f"train.distributed.num_processes={settings.num_processes} needs "
                          "train.distributed.coordinator_address ('host:port' of process 0), or "
                          "SAMS_JAX_DISTRIBUTED=1 to read it from the environment (JAX_COORDINATOR_ADDRESS, SLURM)")
    # what the process count alone decides, checked before joining (a single process would otherwise wait for
    # its partners until the timeout, then abort; validate_against_data checks again with the joined count)
    n_processes = int(settings.num_processes)
    if n_processes > 1 and config.train.data_shards:
        _check_shards(config.train.data_shards, n_processes)
    shards = config.train.data_shards or n_processes
    if n_processes > 1 and config.train.batch_size % shards:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be a multiple of the data shards "
                          f"({shards}: train.data_shards, or one per process) and of the devices of all processes; "
                          f"e.g. train.batch_size={config.train.batch_size - config.train.batch_size % shards or shards}")
    placement = config.train.get("data_placement", "auto")
    streams = "train.data_placement='host'" if placement == "host" else \
        "data.backed=True with train.data_placement='auto'" if placement == "auto" and config.data.get("backed") else ""
    if n_processes > 1 and streams:
        raise ConfigError(f"{streams} streams the training cells from the host, which supports a single process "
                          f"only; this run has {n_processes} processes. Set train.data_placement='device' (each "
                          "process keeps its own shards on its devices), or run one process")


def _check_shards(n_shards: int, n_processes: int) -> None:
    if n_shards % n_processes:
        raise ConfigError(f"train.data_shards={n_shards} must be a multiple of the number of processes "
                          f"({n_processes}), or 0 (one shard per process)")


RAW_COUNT_MIN_MAX = 20  # _warn_about_values: whole numbers reaching this look like raw counts
LOG_VALUES_MAX = 16.0  # _warn_about_values: non-integer values in [0, this] look log-transformed (log1p(1e6) = 13.8)


def _warn_about_values(config, data, n_cells: int = 1_000) -> None:
    """``DataWarning``s about the values of the first ``n_cells`` training cells under the
    ``normal`` likelihood: non-negative whole numbers reaching ``RAW_COUNT_MIN_MAX`` look
    like raw counts (a normal fits them poorly and can diverge); non-integer values in
    ``[0, LOG_VALUES_MAX]`` under ``normalization='log_standardize'`` look log-transformed
    already (the encoder would see a log of logs)."""
    import warnings

    import numpy as np
    import scipy.sparse as sp

    from sams_jax.data.anndata_io import DataWarning

    rows = data.rows("train")[:n_cells]
    if config.model.likelihood != "normal" or not len(rows):
        return
    block = data.x[rows]
    values = np.asarray(block.data if sp.issparse(block) else block)
    if not values.size or values.min() < 0:
        return
    whole = np.all(values == np.round(values))
    if whole and values.max() >= RAW_COUNT_MIN_MAX:
        warnings.warn(f"model.likelihood='normal', but x looks like raw counts (whole numbers up to "
                      f"{values.max():g} in the first {len(rows):,} training cells); a normal likelihood on raw "
                      "counts fits them poorly and can diverge: use model.likelihood='library_nb' (the paper's for "
                      "counts) or 'poisson', or give log-normalised values", DataWarning, stacklevel=3)
    elif not whole and values.max() <= LOG_VALUES_MAX and config.model.normalization == "log_standardize":
        warnings.warn(f"x looks log-transformed already (values from 0 to {values.max():.3g}, not whole numbers, in "
                      f"the first {len(rows):,} training cells), and model.normalization='log_standardize' feeds "
                      "the encoder log(1 + x) of them again: set --config.model.normalization=standardize for "
                      "log-normalised values", DataWarning, stacklevel=3)


def validate_against_data(config, data) -> None:
    """Checks that need the data (sizes) or the devices, still before any compilation."""
    n_train = int((data.split == "train").sum())
    _warn_about_values(config, data)
    import jax

    available = jax.local_device_count()
    if config.train.num_devices < 0 or config.train.num_devices > available:
        raise ConfigError(f"train.num_devices={config.train.num_devices} is out of range; this machine has "
                          f"{available} local device(s) (0 = all)")
    n_processes = jax.process_count()
    if n_processes > 1:
        if resolve_placement(config.train.data_placement, data) == "host":
            raise ConfigError(
                f"train.data_placement={config.train.data_placement!r} means streaming the training cells from "
                f"the host here, which supports a single process only; this run has {n_processes} processes. "
                "Set train.data_placement='device' explicitly (each process then keeps its own shards of the "
                "training cells on its devices; 'auto' streams backed files and large data from the host), or run "
                "one process")
    n_devices = (config.train.num_devices or available) * n_processes
    where = f"{n_devices // n_processes} per process x {n_processes} processes" if n_processes > 1 else ""
    if config.train.batch_size % n_devices:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be divisible by the number of devices "
                          f"({n_devices}{', ' + where if where else ''}); choose a multiple of {n_devices} or set "
                          "train.num_devices")
    n_shards = config.train.data_shards or n_processes
    _check_shards(n_shards, n_processes)
    if config.train.batch_size % n_shards:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be divisible by the number of data "
                          f"shards ({n_shards}); choose a multiple of {n_shards}")
    if config.train.batch_size > n_train:
        raise ConfigError(f"train.batch_size={config.train.batch_size} is larger than the training set "
                          f"({n_train} cells); choose train.batch_size <= {n_train}")
    smallest = n_train // n_shards
    if config.train.batch_size // n_shards > smallest:
        raise ConfigError(f"train.batch_size / data shards = {config.train.batch_size // n_shards} is larger than "
                          f"the smallest shard of the training set ({smallest} cells); use a smaller batch or "
                          "fewer shards")


def unknown_field_message(config, field: str, flag: str = "--config.") -> str | None:
    """The error for ``--config.<field>`` if ``field`` (``"model.likelihod"``) is not in
    ``config``: the unknown part named, with the closest known field, or the known fields
    of its section where none is close; ``None`` if the field exists."""
    import difflib

    node, path = config, []
    for key in field.split("."):
        if not hasattr(node, "keys"):
            return (f"config field {'.'.join(path)!r} is a value, not a section, so {field!r} does not exist; "
                    f"set it with {flag}{'.'.join(path)}=<value>")
        if key not in node:
            section = ".".join(path)
            unknown = ".".join(path + [key])
            where = "" if unknown == field else f" (in {flag}{field})"
            close = difflib.get_close_matches(key, list(node.keys()), n=1)
            if close:
                return f"unknown config field {unknown!r}{where}; did you mean {'.'.join(path + close)!r}?"
            return f"unknown config field {unknown!r}{where}; fields of {section or 'config'}: {sorted(node.keys())}"
        node = node[key]
        path.append(key)
    return None
