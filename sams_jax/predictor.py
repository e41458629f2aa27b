"""Interrogate a trained model: ``sams_jax.load(workdir)`` returns a :class:`Predictor`.

Everything comes from the checkpoint (parameters, config, data metadata); no config file
and no retraining. Interventions are named as in the data: ``"KLF1"`` or a combination
``"KLF1+MAP2K6"`` (members joined by the data's delimiter, ``+`` by default), resolved
through the saved perturbation vocabulary; the control label is the all-zero dosage
unless it is itself a perturbation (as in the simulation, whose reference is ``"0"``).
"""

from __future__ import annotations

import collections
import difflib
import os
import re
import warnings
from functools import partial
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd

from sams_jax.basis import SparseBasis, fit_sparse_basis
from sams_jax.ate import LIBRARY_SIZE, METHODS, SCALES, model_expectations
from sams_jax.checkpoint import Checkpointer, CheckpointError
from sams_jax.data import DataError, PerturbationData
from sams_jax.data.matrix import is_dense
from sams_jax.likelihoods import COUNT_LIKELIHOODS
from sams_jax.models import create_model
from sams_jax.objective import compiler_options, iwelbo_chunk_size, predictive_iwelbo
from sams_jax.streaming import host_cell_scores
from sams_jax.train import create_optimizer, create_train_state

# registration fields that describe how an AnnData stores the screen (not what the model is)
LAYOUT_KEYS = ("perturbation_key", "control", "control_match", "delimiter", "guide_column_pattern", "counts_layer",
               "library_size_key")
# how the training cells were split (with the layout: Predictor.register_training_data)
SPLIT_KEYS = ("split_key", "task", "split_seed", "frac_combinations_train", "frac_combinations_test",
              "frac_combination_cells_train")


class InterventionError(KeyError):
    """An intervention name that the vocabulary cannot resolve."""

    def __str__(self):  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class InterventionWarning(UserWarning):
    """An intervention that the model can predict only by an assumption it was not
    trained under (a combination never seen by a model that encodes combinations as
    perturbations of their own)."""


COMBINATION_DELIMITERS = ("+", "&", ";", " x ")  # for vocabularies registered without a delimiter


def intervention_list(interventions: str | Iterable[str]) -> list[str]:
    """``interventions`` as a list of names: one name (``"A+B"``) is a list of one."""
    if isinstance(interventions, str):
        return [interventions]
    names = list(interventions)
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise InterventionError(f"interventions are names (str), e.g. ['A', 'A+B']; got {bad[:5]}")
    return names


class Predictor:
    """A trained model with its vocabulary. Build with :func:`load`."""

    def __init__(self, model, variables, config, metadata: dict, step: int, workdir: str):
        self.model, self.variables, self.config, self.metadata = model, variables, config, metadata
        self.step, self.workdir = step, workdir
        self.feature_names: list[str] = list(metadata["feature_names"])
        # display names (data.gene_symbols_key), or None
        self.feature_symbols: list[str] | None = metadata.get("feature_symbols")
        self.perturbation_names: list[str] = list(metadata["perturbation_names"])
        self.control: str | None = metadata.get("control")
        registration = metadata.get("registration") or {}
        # combinations are named with the data's delimiter; where the data had none, the first of
        # COMBINATION_DELIMITERS that no perturbation name contains ("&" for Replogle's guide pairs, "A_+_1|A_-_2")
        self.delimiter: str = registration.get("delimiter") or next(
            (d for d in COMBINATION_DELIMITERS if not any(d in name for name in self.perturbation_names)), "+")
        self._index = {name: i for i, name in enumerate(self.perturbation_names)}
        self.encode_combinations: str = registration.get("encode_combinations") or "additive"
        # combinations that are perturbations of their own, by their set of members (any order)
        self._combination_index = {frozenset(part.strip() for part in name.split(self.delimiter)): i
                                   for i, name in enumerate(self.perturbation_names) if self.delimiter in name}

        def generate(variables, dosages, library_size, max_active, rngs):
            return model.apply(variables, dosages, library_size, max_active, rngs=rngs, method="generate")

        self._generate = jax.jit(generate, static_argnums=(3,))
        self._expectations = jax.jit(
            partial(model_expectations, model.apply),
            static_argnames=("n_particles", "scale", "method", "max_active", "library_size",
                             "intervention_chunk", "particle_chunk", "summed_observations"))
        @jax.jit
        def encode(variables, x, dosages, keys):  # -> [n, K], mean over the keys' global draws
            return jax.vmap(lambda key: model.apply(variables, x, dosages, rngs={"globals": key},
                                                    method="encode"))(keys).mean(0)

        self._encode = encode
        self._iwelbo = jax.jit(partial(predictive_iwelbo, model.apply), static_argnames=("n_particles", "chunk_size"),
                               compiler_options=compiler_options())

    def __repr__(self) -> str:
        return (f"Predictor(model={self.config.model.name!r}, workdir={self.workdir!r}, step={self.step}, "
                f"genes={len(self.feature_names)}, perturbations={len(self.perturbation_names)}, "
                f"control={self.control!r})")

    # --- vocabulary -----------------------------------------------------------------
    @property
    def default_scale(self) -> str:
        return "perturbseq" if self.config.model.likelihood in COUNT_LIKELIHOODS else "mean"

    def dosages(self, interventions: str | Sequence[str]) -> np.ndarray:
        """Dosage rows ``[I, T]`` for intervention names (one name or a list); the control
        label (when not a perturbation of the vocabulary) is the all-zero row. Members of
        a combination may come in any order (``"B+A"`` is ``"A+B"``) and each once.

        With ``encode_combinations="unique"`` a combination the model was trained on is
        its own perturbation (whatever the order of its members); one it was not trained
        on is predicted as the sum of its members' shifts, which that model never learned
        to do, with an :class:`InterventionWarning`."""
        interventions = intervention_list(interventions)
        rows = np.zeros((len(interventions), len(self.perturbation_names)), np.float32)
        for i, name in enumerate(interventions):
            if name in self._index:  # includes combinations encoded as their own perturbation
                rows[i, self._index[name]] = 1.0
                continue
            parts = frozenset(part.strip() for part in name.split(self.delimiter)) - {self.control}
            if len(parts) > 1 and parts in self._combination_index:  # one, in another order
                rows[i, self._combination_index[parts]] = 1.0
                continue
            members = self._members(name)
            if len(members) > 1 and not getattr(self.model, "composes_perturbations", True):
                raise InterventionError(
                    f"{name!r} combines perturbations, which model {self.config.model.name!r} cannot predict: its "
                    "perturbations do not add (it is trained on one perturbation per cell); combinations it was "
                    f"trained on as perturbations of their own are {self._combinations() or 'none'}")
            if len(members) > 1 and self.encode_combinations == "unique":
                warnings.warn(
                    f"{name!r} is not a perturbation of this model: it encodes each combination it was trained on "
                    "as a perturbation of its own (encode_combinations='unique') and never learned that "
                    "combinations add; predicted here as the sum of its members' shifts", InterventionWarning,
                    stacklevel=3)
            for member in members:
                rows[i, self._index[member]] += 1.0
        return rows

    def _combinations(self) -> list[str]:
        """Vocabulary entries that are combinations (``encode_combinations="unique"``)."""
        return [self.perturbation_names[i] for i in self._combination_index.values()][:10]

    def _members(self, name: str) -> list[str]:
        """The vocabulary members of an intervention name (the control dropped)."""
        members = []
        for member in (part.strip() for part in name.split(self.delimiter)):
            if member in self._index:
                members.append(member)
            elif member != self.control or not member:
                same_letters = [n for n in self.perturbation_names if n.casefold() == member.casefold()]
                close = list(dict.fromkeys(same_letters + difflib.get_close_matches(
                    member, self.perturbation_names, n=5, cutoff=0.5)))[:5]
                hint = f"closest known names: {close}" if close else \
                    f"known names include {self.perturbation_names[:10]}"
                if member in self.feature_names or member in (self.feature_symbols or ()):
                    hint = f"{member!r} is one of the model's genes, not a perturbation ({hint})"
                if self.control is not None:
                    hint += f"; the control is {self.control!r}"
                raise InterventionError(
                    f"unknown perturbation {member!r} in intervention {name!r}; {hint}. Combinations are "
                    f"written with {self.delimiter!r} between members, e.g. 'A{self.delimiter}B'")
        repeated = sorted({m for m in members if members.count(m) > 1})
        if repeated:
            raise InterventionError(f"intervention {name!r} names {repeated} more than once; a combination lists "
                                    "each perturbation once")
        return members

    def canonical_name(self, name: str) -> str:
        """The vocabulary's name of an intervention: members in vocabulary order, a
        combination trained as its own perturbation under its own name (``"B+A"`` ->
        ``"A+B"``)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InterventionWarning)
            return self.intervention_name(self.dosages([name])[0])

    def _dosage_rows(self, interventions) -> np.ndarray:
        """``[I, T]`` dosage rows of intervention names (one or a list, as for
        :meth:`dosages`) or of given rows (``[I, T]`` or one ``[T]`` row)."""
        if not isinstance(interventions, str) and not len(interventions):
            return np.zeros((0, len(self.perturbation_names)), np.float32)
        if isinstance(interventions, str) or all(isinstance(i, str) for i in interventions):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InterventionWarning)
                return self.dosages(interventions)
        rows = np.asarray(interventions, np.float32)
        rows = rows[None] if rows.ndim == 1 and len(rows) == len(self.perturbation_names) else rows
        if rows.ndim != 2 or rows.shape[1] != len(self.perturbation_names):
            raise InterventionError(f"expected intervention names (e.g. ['A', 'A+B']) or dosage rows "
                                    f"[I, {len(self.perturbation_names)}] (predictor.dosages(names)); got an array "
                                    f"of shape {rows.shape}")
        return rows

    def learned(self, interventions) -> np.ndarray:
        """``[I]`` bool: every perturbation of each intervention (names, or dosage rows
        ``[I, T]``) had training cells when the model was trained (the checkpoint's
        metadata). The effects of the others are the prior's, not learned. All True where
        the metadata has no counts (a predictor built by hand)."""
        rows = self._dosage_rows(interventions)
        counts = self.metadata.get("cells_per_perturbation", {}).get("train")
        if counts is None:
            return np.ones(len(rows), bool)
        trained = np.asarray(counts) > 0
        return np.all(trained | (rows == 0), axis=1)

    def seen_in_training(self, interventions) -> np.ndarray | None:
        """``[I]`` bool: some training cells received exactly the perturbations of each
        intervention (names, or dosage rows ``[I, T]``; the control: no perturbation).
        False for what a model predicts by composing effects: a combination never given
        together, and (additive encoding) a perturbation given only inside combinations.
        ``None`` for checkpoints saved before these sets were recorded
        (``metadata["training_conditions"]``)."""
        conditions = self.metadata.get("training_conditions")
        if conditions is None:
            return None
        seen = {tuple(members) for members in conditions}
        return np.asarray([tuple(np.flatnonzero(row).tolist()) in seen for row in self._dosage_rows(interventions)],
                          bool)

    def intervention_name(self, row: np.ndarray) -> str:
        """Inverse of :meth:`dosages` for one row (members in vocabulary order)."""
        members = [self.perturbation_names[t] for t in np.nonzero(row)[0]]
        return self.delimiter.join(members) if members else (self.control or "control")

    # --- predictions ----------------------------------------------------------------
    def expectations(self, interventions: str | Sequence[str], *, n_particles: int = 2_500, scale: str | None = None,
                     method: str = "paper", seed: int = 0, library_size: float = LIBRARY_SIZE,
                     stream: int = 0) -> np.ndarray:
        """``E[f(x) | do(d)]`` per intervention: ``[I, G]`` float32, rows in the order of
        ``interventions`` (names as for :meth:`dosages`; the control is a row like any
        other, nothing is subtracted: :meth:`ate` does that). ``scale``: ``"perturbseq"``
        (default for count likelihoods) or ``"mean"`` (default otherwise); ``method``:
        ``"paper"`` or ``"crn"`` (see :meth:`ate`); ``n_particles`` draws per intervention;
        ``library_size``: the library size of the generated cells under ``library_nb`` (the
        expected total count of each cell; the paper's evaluation: 10,000). An
        intervention's random numbers depend on the other rows of the call
        (:func:`sams_jax.ate.model_expectations`). ``stream``: another stream of random
        numbers under the same seed (``fold_in``), independent of stream 0's."""
        scale = scale or self.default_scale
        check_scale(self.config.model.likelihood, scale)
        if method not in METHODS:
            raise ValueError(f"unknown ATE method {method!r}; allowed: {METHODS}")
        n_particles = _whole_number(n_particles, "n_particles")
        library_size = _positive_number(library_size, "library_size")
        dosages = self.dosages(interventions)
        if not len(dosages):
            return np.zeros((0, len(self.feature_names)), np.float32)
        max_active = max(1, int((dosages != 0).sum(1).max(initial=0)))
        key = jax.random.key(seed) if not stream else jax.random.fold_in(jax.random.key(seed), stream)
        out = self._expectations(self.variables, jnp.asarray(dosages), key, n_particles=n_particles,
                                 scale=scale, method=method, max_active=max_active, library_size=library_size)
        return np.asarray(out)

    def ate(self, interventions: str | Iterable[str] | None = None, *, control: str | None = None, method: str = "paper",
            n_particles: int = 2_500, scale: str | None = None, seed: int = 0,
            library_size: float = LIBRARY_SIZE):
        """Model average treatment effects relative to ``control`` (default: the data's
        control) as AnnData: obs = interventions, var = genes, ``X`` = ATE,
        ``layers["expectation"]`` = ``E[f(x) | do(d)]``; ``uns`` records the settings.
        ``obs["learned"]``: every member had training cells (:meth:`learned`);
        ``obs["seen_in_training"]``: training cells received exactly this intervention
        (:meth:`seen_in_training`; False for the unseen combinations a model composes; only
        for checkpoints that record the training cells' perturbations).

        ``interventions`` default to every single perturbation of the vocabulary.
        ``method="paper"`` draws independently per intervention (the paper's estimator);
        ``"crn"`` uses common random numbers for a much lower variance. With a
        ``library_nb`` likelihood the model's cells have library size ``library_size`` (their
        expected total count; the paper's evaluation: 10,000): on the ``perturbseq`` scale
        (the default) every cell is scaled to 10,000 counts anyway, but on the ``mean``
        scale the effects are expected counts at that library size, so compare them with
        data normalised to it.
        """
        import anndata

        named = interventions is not None
        interventions = intervention_list(interventions) if named else \
            [p for p in self.perturbation_names if p != (control or self.control)]
        if not interventions:
            raise InterventionError("no interventions given; name some (e.g. ate(['A', 'A+B'])), or leave "
                                    "interventions out for every single perturbation" if named
                                    else "the vocabulary has no perturbation besides the control")
        control = control or self.control
        if control is None:
            raise InterventionError("this model's data has no control label; pass control=...")
        with warnings.catch_warnings():  # expectations() warns about these names
            warnings.simplefilter("ignore", InterventionWarning)
            rows = self.dosages(interventions)
        canonical = [self.intervention_name(row) for row in rows]  # "C+B" is "B+C": one dosage row
        repeated = [name for name, count in collections.Counter(canonical).items() if count > 1]
        if repeated:  # one row per intervention, named as first given: AnnData's obs names must be unique
            warnings.warn(f"{repeated[:10]} given more than once ({len(repeated)} intervention"
                          f"{'s' if len(repeated) > 1 else ''}, members in any order); each intervention is one row "
                          "of the result, named as first given (for several independent estimates, call ate() with "
                          "other seeds)", InterventionWarning, stacklevel=2)
            first = {}
            for name, key in zip(interventions, canonical):
                first.setdefault(key, name)
            interventions = list(first.values())
        self.control_dosage(control)
        scale = scale or self.default_scale
        n_particles = _whole_number(n_particles, "n_particles")
        means = self.expectations([control, *interventions], n_particles=n_particles, scale=scale, method=method,
                                  seed=seed, library_size=library_size)
        with warnings.catch_warnings():  # expectations() has warned about these names already
            warnings.simplefilter("ignore", InterventionWarning)
            rows = self.dosages([control, *interventions])
        as_control = [name for name, row in zip(interventions, rows[1:]) if np.array_equal(row, rows[0])]
        if as_control:
            row = "exactly 0 here (common random numbers)" if method == "crn" else \
                "its row shows only the estimator's Monte-Carlo noise (exactly 0 with method='crn')"
            warnings.warn(f"{as_control} is the control {control!r}: its ATE is 0 by definition; {row}",
                          InterventionWarning, stacklevel=2)
        learned, seen = self.learned(rows), self.seen_in_training(rows[1:])  # [1 + I]; [I] or None
        if not learned.all():
            unlearned = [name for name, ok in zip([control, *interventions], learned) if not ok]
            warnings.warn(f"{unlearned[:10]}{' and others' if len(unlearned) > 10 else ''} ({len(unlearned)} in all) have "
                          "members without training cells: their effects are the prior's, not learned "
                          "(obs['learned'] is False)", InterventionWarning, stacklevel=2)
        columns = {"learned": learned[1:], **({} if seen is None else {"seen_in_training": seen})}
        result = anndata.AnnData(
            X=(means[1:] - means[0]).astype(np.float32),
            obs=pd.DataFrame(columns, index=pd.Index(interventions, name="intervention", dtype=object)),
            var=self.gene_table(),
            layers={"expectation": means[1:].astype(np.float32)},
        )
        result.uns.update(control=control, control_expectation=means[0].astype(np.float32), scale=scale,
                          method=method, n_particles=n_particles, seed=seed, checkpoint_step=self.step)
        return result

    def gene_table(self) -> pd.DataFrame:
        """The genes as an AnnData ``var``: indexed by name, with a ``gene_symbol`` column
        where the data had display names (``data.gene_symbols_key``)."""
        columns = {} if self.feature_symbols is None else {"gene_symbol": list(self.feature_symbols)}
        return pd.DataFrame(columns, index=pd.Index(self.feature_names, name="gene", dtype=object))

    def control_dosage(self, control: str) -> np.ndarray:
        """The dosage row ``[T]`` of ``control`` (the data's control label, or an
        intervention to measure others against); an :class:`InterventionError` that says it
        is the control that is unknown otherwise."""
        try:
            return self.dosages([control])[0]
        except InterventionError as error:
            raise InterventionError(f"control={control!r} is neither the data's control label ({self.control!r}) nor "
                                    f"an intervention of the vocabulary: {error.args[0]}") from None

    def sample(self, interventions: str | Sequence[str], *, n: int = 100, seed: int = 0,
               library_size: float | None = None):
        """``n`` simulated cells per intervention (AnnData with ``obs["intervention"]``).

        ``library_size``: the library size of each generated cell under a ``library_nb``
        likelihood (ignored by the others, but checked to be a positive number under any):
        the expected total count, around which the
        drawn totals vary (negative-binomial noise). Default: the median library size of the
        training cells, as recorded in the checkpoint, so the cells look like the data's
        (checkpoints written before that was recorded: 10,000, the ATEs' fixed size)."""
        import anndata

        interventions = intervention_list(interventions)
        n = _whole_number(n, "n (cells per intervention)")
        library_size = self.training_library_size if library_size is None else \
            _positive_number(library_size, "library_size")
        dosages = np.repeat(self.dosages(interventions), n, axis=0)
        max_active = max(1, int((dosages != 0).sum(1).max(initial=0)))
        global_key, local_key = jax.random.split(jax.random.key(seed))
        x, _ = self._generate(self.variables, jnp.asarray(dosages), jnp.full((dosages.shape[0],), library_size),
                              max_active, {"globals": global_key, "local": local_key})
        obs = pd.DataFrame({"intervention": pd.Categorical(np.repeat(interventions, n))},
                           index=pd.Index([f"cell{i}" for i in range(len(dosages))], name="cell", dtype=object))
        result = anndata.AnnData(X=np.asarray(x), obs=obs,
                                 var=self.gene_table())
        result.uns.update(library_size=library_size, seed=seed, checkpoint_step=self.step)
        return result

    @property
    def history(self) -> pd.DataFrame:
        """The run's ``history.csv`` (one row every ``train.eval_every`` steps; empty for a
        predictor without a work directory)."""
        path = os.path.join(self.workdir, "history.csv")
        return pd.read_csv(path) if self.workdir and os.path.exists(path) else pd.DataFrame()

    @property
    def checkpoints(self) -> list[int]:
        """The steps of the run's checkpoints (what ``sams_jax.load(workdir, checkpoint=step)``
        takes); this predictor's is ``step``."""
        if not self.workdir:
            return []
        checkpointer = Checkpointer(self.workdir, read_only=True)
        try:
            return sorted(checkpointer.steps())
        finally:
            checkpointer.close()

    @property
    def training_library_size(self) -> float:
        """Median total counts per training cell, as recorded at training (10,000 where
        the checkpoint predates that record)."""
        return float(self.metadata.get("median_library_size") or LIBRARY_SIZE)

    def register(self, adata_or_path, backed: bool = False, **layout) -> PerturbationData:
        """An AnnData (or ``.h5ad`` path) read with the training data's registration
        (perturbation column, control, delimiter, counts layer, ...), checked against the
        model's genes (reordered to them) and perturbation vocabulary; ``backed`` leaves
        the counts of a file on disk (see ``from_anndata``).

        ``layout`` overrides how this AnnData stores what the training data stored, when it
        differs: ``perturbation_key``, ``control``, ``control_match``, ``delimiter``,
        ``guide_column_pattern``, ``counts_layer``, ``library_size_key`` (e.g.
        ``predictor.register(adata, perturbation_key="gene", counts_layer=None)``; pass
        the result to :meth:`iwelbo` or :meth:`latent`). The genes and the perturbation
        vocabulary stay the model's."""
        from sams_jax.data.anndata_io import check_source, from_anndata

        unknown = sorted(set(layout) - set(LAYOUT_KEYS))
        if unknown:
            raise TypeError(f"register() got {unknown}; it accepts backed= and the layout keys {list(LAYOUT_KEYS)}")
        check_source(adata_or_path)  # before the registration's advice, which would not apply
        saved = self.metadata.get("registration")
        registration = self._saved_registration(LAYOUT_KEYS)
        registration.update(layout)
        try:
            return from_anndata(adata_or_path, **registration, likelihood=self.config.model.likelihood,
                                perturbations=self.perturbation_names, feature_names=self.feature_names,
                                backed=backed, for_training=False)
        except DataError as error:
            used = ", ".join(f"{k}={registration[k]!r}" for k in LAYOUT_KEYS if k in registration)
            how = f"the registration {used}: the model's, with any overrides given" if saved else \
                "from_anndata's default registration (the model was not trained on an AnnData)" + \
                (f" with {used}" if used else "")
            raise self._registration_error(error, adata_or_path, f"this AnnData was read with {how}; where it "
                                           "stores things differently, pass those keys to predictor.register("
                                           "adata, ...) and score its result") from None

    def _registration_error(self, error: DataError, adata_or_path, how: str) -> DataError:
        """``error`` of registering data for this model, without the registration's training
        flags (``--config.data...``, which do not apply to a trained model's data), with the
        gene-symbol hint where it applies and ``how`` the data were read."""
        hint = _symbols_hint(self.feature_names, _var_names(adata_or_path), self.feature_symbols) \
            if "the genes of this AnnData differ" in str(error) else ""
        advice = re.sub(r" \(--config\.data\.[^()]*\)", "", str(error).rstrip("."))
        return type(error)(f"{advice}{hint} ({how})")

    def register_training_data(self, adata_or_path, backed: bool = False) -> PerturbationData:
        """The run's training data from an AnnData (or ``.h5ad`` path): registered as at
        training, cell split included (the checkpoint's registration: layout, ``split_key`` /
        ``task``, ``split_seed``, ...), and checked against the checkpoint's metadata
        (:meth:`training_data_differences`). A random or task split follows the order of
        the cells, so only the training file, cells in the same order, gives the run's
        splits; anything else is a :class:`DataError` naming what differs."""
        from sams_jax.data.anndata_io import check_source, from_anndata

        check_source(adata_or_path)
        saved = self.metadata.get("registration")
        if not saved:
            raise DataError(f"the run was not trained on an AnnData (its data: {self.metadata.get('name')!r}), so no "
                            "AnnData reproduces its data and splits; pass the PerturbationData the run was trained "
                            "on (evaluate(workdir, data=data)), or score an AnnData's cells without split= "
                            "(predictor.iwelbo(adata))")
        registration = self._saved_registration((*LAYOUT_KEYS, *SPLIT_KEYS))
        try:
            with warnings.catch_warnings():  # the registration's warnings about these data were given at training
                warnings.simplefilter("ignore", UserWarning)
                data = from_anndata(adata_or_path, **registration, likelihood=self.config.model.likelihood,
                                    perturbations=self.perturbation_names, feature_names=self.feature_names,
                                    backed=backed, for_training=False)
        except DataError as error:
            used = ", ".join(f"{k}={registration[k]!r}" for k in (*LAYOUT_KEYS, *SPLIT_KEYS) if registration.get(k))
            raise self._registration_error(error, adata_or_path, f"this AnnData was read as the run's training data "
                                           f"were, {used}: the run's splits need its training file as it was "
                                           "then") from None
        differ = self.training_data_differences(data)
        if differ:
            raise DataError(f"this AnnData is not the run's training data as registered then: {'; '.join(differ)} "
                            "differ from the checkpoint's metadata (a random or task split follows the order of the "
                            "cells: the same cells in another order are split otherwise). The run's splits need its "
                            "training file, cells in the same order; to score other cells, leave split= out (every "
                            "cell) or subset the AnnData to the cells wanted")
        return data

    def _saved_registration(self, keys: Sequence[str]) -> dict:
        """The checkpoint's registration settings among ``keys`` (with the encoding and the
        gene selection, which fix the vocabulary and genes), those it recorded."""
        saved = self.metadata.get("registration") or {}
        return {k: saved[k] for k in (*keys, "encode_combinations", "use_highly_variable") if k in saved}

    def training_data_differences(self, data: PerturbationData) -> list[str]:
        """:func:`training_data_differences` of this checkpoint's metadata."""
        return training_data_differences(self.metadata, data)

    def _data(self, data, split: str | None = None):
        """A PerturbationData (registered from an AnnData / ``.h5ad`` path if need be: with
        ``split``, as the training data were, see :meth:`register_training_data`; genes and
        perturbations checked) or a dict of arrays."""
        if not isinstance(data, (PerturbationData, dict)):
            data = self.register_training_data(data) if split else self.register(data)
        if isinstance(data, PerturbationData):
            check_features(self.feature_names, data.feature_names, self.feature_symbols)
            check_perturbations(self.perturbation_names, data.perturbation_names)
        return data

    def _streamed(self, data, split: str | None):
        """Cell positions to read in blocks when ``data`` holds a sparse or backed ``x``; else None."""
        if isinstance(data, PerturbationData) and not is_dense(data.x):
            return _some_cells(data.rows(split) if split else np.arange(data.x.shape[0]), split)
        return None

    def _arrays(self, data, split: str | None = None) -> dict[str, jnp.ndarray]:
        """Cell arrays from a PerturbationData (the cells of ``split``, or all), an AnnData /
        ``.h5ad`` path, or a dict of ``x [n, G]``, ``dosages [n, T]`` and ``library_size [n]``."""
        data = self._data(data)
        if isinstance(data, PerturbationData):
            data = data.arrays(split) if split else {"x": data.x, "dosages": data.dosages,
                                                     "library_size": data.library_size}
        elif split:
            raise ValueError("split= selects cells of a PerturbationData; a dict of arrays has no splits")
        if data["x"].shape[1] != len(self.feature_names) or data["dosages"].shape[1] != len(self._index):
            raise DataError(f"x must have {len(self.feature_names)} genes and dosages {len(self._index)} columns; "
                            f"got {data['x'].shape[1]} and {data['dosages'].shape[1]}")
        n = data["x"].shape[0]
        for key in ("dosages", "library_size"):
            if key in data and np.shape(data[key])[0] != n:
                raise DataError(f"{key} has {np.shape(data[key])[0]} rows but x has {n} cells; pass one row per cell")
        _some_cells(np.arange(n), split)
        return {k: jnp.asarray(v, jnp.float32) for k, v in data.items()}

    def iwelbo(self, data, n_particles: int = 100, seed: int = 0, chunk_size: int | None = None,
               split: str | None = None) -> np.ndarray:
        """Per-cell predictive IWELBO (``[n]``; SPEC 5) of the cells in ``data`` (of its
        ``split`` only: a PerturbationData's own split; for an AnnData or path the run's,
        which needs the training file itself, see :meth:`register_training_data`;
        ``split=None``: every cell, also those a task leaves out of every split, split
        ``""``). A sparse or backed ``x`` is read and scored
        in blocks of cells, with the same result as scoring all cells at once. Cells are
        scored ``chunk_size`` at a time (default :func:`iwelbo_chunk_size`); the local draws
        depend on the chunking, so compare numbers computed with the same chunk size."""
        n_particles = _whole_number(n_particles, "n_particles")
        chunk_size = _whole_number(chunk_size, "chunk_size") if chunk_size else \
            iwelbo_chunk_size(n_particles, len(self.feature_names))  # None or 0: the default
        data = self._data(data, split)
        key = jax.random.key(seed)
        cells = self._streamed(data, split)
        if cells is not None:
            def block(arrays, first_chunk):
                return self._iwelbo(self.variables, key, arrays, n_particles=n_particles, chunk_size=chunk_size,
                                    first_chunk=first_chunk)

            return host_cell_scores(block, data, cells, chunk_size, put=jax.device_put)
        arrays = self._arrays(data, split)
        return np.asarray(self._iwelbo(self.variables, key, arrays, n_particles=n_particles, chunk_size=chunk_size))

    def latent(self, data, n_particles: int = 10, seed: int = 0, split: str | None = None) -> np.ndarray:
        """Posterior mean of the basal latent state (``[n, K]``), averaged over
        ``n_particles`` draws of the global variables (cells of ``split`` only, for a
        PerturbationData, else every cell, as for :meth:`iwelbo`; a sparse or backed ``x``
        is read in blocks of cells)."""
        n_particles = _whole_number(n_particles, "n_particles")
        data = self._data(data, split)
        keys = jax.random.split(jax.random.key(seed), n_particles)
        cells = self._streamed(data, split)
        if cells is not None:
            return host_cell_scores(lambda arrays, _: self._encode(self.variables, arrays["x"], arrays["dosages"], keys),
                                    data, cells, 1024, put=jax.device_put)
        arrays = self._arrays(data, split)
        return np.asarray(self._encode(self.variables, arrays["x"], arrays["dosages"], keys))

    def get_latent_representation(self, data, n_particles: int = 10, seed: int = 0,
                                  split: str | None = None) -> np.ndarray:
        """:meth:`latent` under scvi-tools' name."""
        return self.latent(data, n_particles=n_particles, seed=seed, split=split)

    def _per_perturbation(self, method: str) -> pd.DataFrame:
        if not hasattr(self.model, method):
            from sams_jax.models import MODELS

            having = sorted(name for name, cls in MODELS.items() if hasattr(cls, method))
            raise NotImplementedError(f"model {self.config.model.name!r} has no {method.replace('_', ' ')} (models "
                                      f"that have: {having}); its perturbations' effects are in ate() and sample()")
        values = np.asarray(self.model.apply(self.variables, method=method))
        return pd.DataFrame(values, index=pd.Index(self.perturbation_names, name="perturbation"),
                            columns=[f"latent_{k}" for k in range(values.shape[1])])

    def mask_probs(self) -> pd.DataFrame:
        """``q(mask = 1)`` per perturbation x latent dimension."""
        return self._per_perturbation("mask_probs")

    def embeddings(self) -> pd.DataFrame:
        """Guide mean of the embeddings per perturbation x latent dimension."""
        return self._per_perturbation("embedding_means")

    def shifts(self) -> pd.DataFrame:
        """Expected latent shift per perturbation x latent dimension: the embedding means
        (at the most probable mask) times ``q(mask = 1)``; the embedding means alone for
        models without a mask."""
        shifts = self.embeddings()
        if hasattr(self.model, "mask_probs"):
            shifts = shifts * self.mask_probs().to_numpy()
        return shifts

    def sparse_basis(self, n_restarts: int = 8, seed: int = 0, threshold: float | None = None) -> SparseBasis:
        """The basis of the latent space in which the perturbations' shifts are sparsest,
        with the effects and the mask read in it (:mod:`sams_jax.basis`). An
        interpretation of the trained model; predictions do not change. Map latent states
        into it with ``basis.transform(predictor.latent(adata))``."""
        return fit_sparse_basis(self.shifts(), n_restarts=n_restarts, seed=seed, threshold=threshold)


def check_scale(likelihood: str, scale: str) -> None:
    """``ValueError`` for an unknown ATE scale, or ``"perturbseq"`` under a likelihood that
    generates real values rather than counts."""
    if scale not in SCALES:
        raise ValueError(f"unknown ATE scale {scale!r}; allowed: {SCALES}")
    if scale == "perturbseq" and likelihood not in COUNT_LIKELIHOODS:
        raise ValueError(f"ATE scale 'perturbseq' (each cell scaled to 10,000 total counts, then log2(x + 1)) needs "
                         f"counts, but the {likelihood!r} likelihood generates real values (negative ones give NaN); "
                         "use scale='mean' (--ate-scale mean), the default for this likelihood")


def _some_cells(cells: np.ndarray, split: str | None) -> np.ndarray:
    """``cells`` (positions), or a :class:`DataError` when there are none to score."""
    if len(cells) == 0:
        where = f"split {split!r} of these data has no cells" if split else "these data have no cells"
        raise DataError(f"nothing to score: {where}; pass data with cells"
                        + (" or another split" if split else ""))
    return cells


def _whole_number(value, name: str) -> int:
    """``value`` as an ``int`` >= 1; ``ValueError`` naming ``name`` otherwise (fractions,
    NaN, infinities)."""
    try:
        whole = int(value)
    except (TypeError, ValueError, OverflowError):
        whole = None
    if whole is None or whole != value or whole < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return whole


def _positive_number(value, name: str) -> float:
    """``value`` as a finite ``float`` > 0; ``ValueError`` naming ``name`` otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (a cell's expected total count), got {value!r}")
    return number


def check_features(expected: Sequence[str], given: Sequence[str], symbols: Sequence[str] | None = None) -> None:
    """Raise :class:`DataError` naming missing and extra genes when the sets differ (with a
    hint when the given names are the model's display names, ``symbols``), or when the
    genes are in another order than the model's."""
    from sams_jax.data.anndata_io import check_genes

    try:
        check_genes(expected, given)
    except DataError as error:
        raise DataError(f"{error}{_symbols_hint(expected, given, symbols)}") from None
    if list(expected) != list(given):
        raise DataError("the data has the model's genes in a different order; reorder them to the training order "
                        "(e.g. adata[:, predictor.feature_names])")


def _var_names(adata_or_path) -> list[str]:
    """The gene names of an AnnData or ``.h5ad`` path (read backed; ``[]`` if unreadable)."""
    if hasattr(adata_or_path, "var_names"):
        return list(map(str, adata_or_path.var_names))
    try:
        import anndata

        adata = anndata.read_h5ad(adata_or_path, backed="r")
        try:
            return list(map(str, adata.var_names))
        finally:
            adata.file.close()
    except (OSError, ValueError, TypeError, KeyError):
        return []


def _symbols_hint(expected: Sequence[str], given: Sequence[str], symbols: Sequence[str] | None) -> str:
    """A sentence for a gene-set error when most of the ``given`` gene names are the
    model's display names (``symbols``) rather than its gene names; else ``""``."""
    as_symbols = (set(map(str, given)) & set(symbols or ())) - set(expected)
    if len(as_symbols) < max(1, len(set(given)) // 2):
        return ""
    return (f". {len(as_symbols)} of the data's gene names are the model's gene symbols (predictor.feature_symbols), "
            "not the names it was trained with (predictor.feature_names): name the genes as at training, e.g. "
            "adata.var_names = adata.var[<column of those names>] (predictor.gene_table() maps the two)")


def training_data_differences(metadata: dict, data: PerturbationData) -> list[str]:
    """The fields of a checkpoint's data ``metadata`` that ``data`` do not match
    (:func:`sams_jax.data.metadata_differences`: names, cells per split and perturbation,
    the training cells' normalisation statistics, ...); empty for the data the run was
    trained on."""
    from sams_jax.data import metadata_differences

    return metadata_differences(metadata, data.metadata(metadata["normalization"]))


def check_perturbations(expected: Sequence[str], given: Sequence[str]) -> None:
    """Raise :class:`DataError` when a PerturbationData's dosage columns (``given``) are not
    the model's perturbations in the model's order: dosages meet the model column by
    column, so other columns would give cells other perturbations' effects."""
    if list(expected) == list(given):
        return
    missing, extra = [n for n in expected if n not in set(given)], [n for n in given if n not in set(expected)]
    how = f"the model's {len(expected)} in another order" if not missing and not extra else \
        f"{len(given)} columns for the model's {len(expected)}; the model's not among them: {missing[:10]}" \
        f"{' ...' if len(missing) > 10 else ''}; not the model's: {extra[:10]}{' ...' if len(extra) > 10 else ''}"
    raise DataError(f"the data's dosage columns are not the model's perturbations ({how}); register the AnnData "
                    "against the model's vocabulary: predictor.register(adata) (or from_anndata(adata, "
                    "perturbations=predictor.perturbation_names, ...))")


def load(workdir: str, checkpoint: str | int = "best") -> Predictor:
    """Load the ``best`` (default), ``latest`` or a given step's checkpoint of a run."""
    import os

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise CheckpointError(f"no checkpoints in {workdir!r}; train first with "
                              f"python -m sams_jax.train --config configs/<name>.py --workdir {workdir}")
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        step = checkpointer.resolve(checkpoint)
        config_dict, metadata = checkpointer.restore_json(step)
        config = ml_collections.ConfigDict(config_dict)
        model = create_model(config.model, len(metadata["feature_names"]), len(metadata["perturbation_names"]))
        stats = {k: np.asarray(v, np.float32) for k, v in metadata["normalization_stats"].items()}
        # the state's structure, shapes and dtypes without computing it; restored onto the default
        # device (jax.default_device, else this process's first), wherever and on how many devices
        # it was trained
        default = jax.config.jax_default_device
        device = jax.sharding.SingleDeviceSharding(default if isinstance(default, jax.Device)
                                                   else jax.local_devices()[0])
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                              jax.eval_shape(lambda: create_train_state(model, create_optimizer(config.train), stats,
                                                                        jax.random.key(0))))
        state = checkpointer.restore_state(step, target)
    finally:
        checkpointer.close()
    return Predictor(model, state.variables, config, metadata, step, workdir)
