"""Perturbation screens stored as AnnData (``.h5ad``) -> :class:`PerturbationData`.

Registration, as scvi-tools and CPA users know it: name the perturbation column of
``obs``, the control label, the combination delimiter, the counts layer and (optionally)
a split column and a library-size column::

    data = PerturbationData.from_anndata("screen.h5ad", perturbation_key="perturbation",
                                         control="control", delimiter="+",
                                         counts_layer="counts")

Conditions are read in one of two ways:

* **labels** (default): ``obs[perturbation_key]`` holds ``"A"``, ``"A+B"`` or the control
  label. A pair's members are sorted (``"B+A"`` is ``"A+B"``); a member equal to the control
  label is dropped (``"A+ctrl"`` is the single ``"A"``, ``"ctrl+ctrl"`` the control), as in
  GEARS-style files. ``delimiter=None`` (or ``""``) treats every label as one perturbation.
* **guide columns** (``guide_column_pattern="guide_"``, the curated Norman file): every obs
  column whose name contains the pattern (besides ``guide_identity`` / ``guide_ids`` and
  the perturbation key) is a 0/1 indicator of one targeted gene; a cell with none is a
  control; ``obs[perturbation_key]`` (``guide_identity``) names the condition.

Dosages: ``encode_combinations="additive"`` (default) has one column per single
perturbation, sorted by name, and a pair is the sum of its two one-hot rows;
``"unique"`` has one column per distinct condition (a pair is a perturbation of its own),
named by its members joined with the delimiter (``"A+B"``; with guide columns too, whatever
the ``guide_identity``, and with ``"+"`` when the delimiter is None; a vocabulary of
``guide_identity`` strings, saved by checkpoints before this naming, is still read).
Control cells have all-zero rows in both. All checks below raise :class:`DataError` with
the problem and the fix, before anything is compiled or written.

Counts: a sparse ``X`` or counts layer stays sparse (``x`` is a float32 CSR matrix); a
dense one stays dense. ``backed=True`` (``--config.data.backed=True``) reads ``obs`` and
``var`` only and leaves the counts in the file (``x`` is a
:class:`~sams_jax.data.matrix.BackedMatrix` whose rows are read on demand); the value
checks and the library sizes then take one pass over the file, a block of cells at a
time.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sams_jax.data import matrix as matrix_lib
from sams_jax.data import splits as splits_lib
from sams_jax.data.dataset import SPLITS, DataError, PerturbationData
from sams_jax.data.matrix import BackedMatrix

ENCODINGS = ("additive", "unique")
CONTROL_MATCHES = ("exact", "contains")
COUNT_LIKELIHOODS = ("poisson", "library_nb")
# sams_jax.likelihoods.LIKELIHOODS, which the data layer does not import (tested equal)
KNOWN_LIKELIHOODS = ("normal", *COUNT_LIKELIHOODS)
# obs columns that contain "guide_" in the curated Norman file but are not indicators
NON_INDICATOR_COLUMNS = ("guide_identity", "guide_ids")
_SHOW = 10  # names shown in an error message


class DataWarning(UserWarning):
    """Data that can be trained on but that limits what can be evaluated."""


def _label(value) -> str | None:
    """A label-like argument (the control, a vocabulary entry, a gene name) as the string
    it is compared with: obs labels and var names are read as strings, so ``0`` (an
    ``int`` or ``numpy`` integer, or the float ``0.0``) matches the label ``"0"``; ``None``
    stays ``None``."""
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and value == round(value) \
            and abs(value) < 2**53:  # as _label_strings reads a column of them
        value = int(value)
    return None if value is None else str(value)


def _label_strings(column: pd.Series) -> pd.Series:
    """obs labels as strings. Whole-number floats read as integers (``1.0`` -> ``"1"``): an
    integer column that a missing value once made float keeps its integer labels."""
    values = column.astype(column.cat.categories.dtype) if isinstance(column.dtype, pd.CategoricalDtype) else column
    if pd.api.types.is_float_dtype(values.dtype):
        numbers = values.to_numpy(dtype=np.float64)
        if np.isfinite(numbers).all() and np.array_equal(numbers, np.round(numbers)) \
                and (np.abs(numbers) < 2**53).all():  # integers that float64 holds exactly
            return pd.Series(numbers.astype(np.int64).astype(str), index=column.index)
    return column.astype(str)


def _labels(values: Sequence | None) -> list[str] | None:
    return None if values is None else [_label(value) for value in values]


def _show(names, limit: int = _SHOW) -> str:
    names = [str(n) for n in names]
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


# ----------------------------------------------------------------------------- reading


class BackedAnnData:
    """The parts of an ``.h5ad`` file that registration reads, with the counts left on
    disk: ``obs`` and ``var`` in memory; ``X`` and ``layers[name]`` as
    :class:`~sams_jax.data.matrix.BackedMatrix` (opened when first used).

    ``anndata.read_h5ad(path, backed="r")`` leaves only ``X`` on disk and reads every
    layer into memory, so the counts layer would be loaded whole; this reads it backed.
    """

    def __init__(self, path: str):
        import h5py
        from anndata.io import read_elem

        self.path = path
        with h5py.File(path, "r") as handle:
            self.obs = read_elem(handle["obs"])
            self.var = read_elem(handle["var"])
            self._has_x = "X" in handle
            self._layers = list(handle["layers"].keys()) if "layers" in handle else []
            self._has_raw = "raw" in handle

    obs_names = property(lambda self: self.obs.index)
    var_names = property(lambda self: self.var.index)
    n_obs = property(lambda self: len(self.obs))
    n_vars = property(lambda self: len(self.var))

    @property
    def X(self):
        return BackedMatrix(self.path, "X") if self._has_x else None

    @property
    def layers(self) -> dict:
        return _LazyLayers(self.path, self._layers)

    @property
    def raw(self) -> str | None:
        """Where the file's ``raw`` is (``"<path>:raw"``; it is not read), or None: what
        the missing-layer error needs to point to it."""
        return f"{self.path}:raw" if self._has_raw else None


class _LazyLayers(dict):
    """``{name: BackedMatrix}``; a layer is opened when it is looked up."""

    def __init__(self, path: str, names: list[str]):
        super().__init__({name: None for name in names})
        self._path = path

    def __getitem__(self, name):
        if name not in self:
            raise KeyError(name)
        return BackedMatrix(self._path, f"layers/{name}")


def read_uns(path, key: str):
    """``uns[key]`` of an ``.h5ad`` file, read alone (the counts stay on disk); ``None`` where
    the file has no such entry; :class:`DataError` where it has one that cannot be read."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as handle:
        if "uns" not in handle or key not in handle["uns"]:
            return None
        try:
            return read_elem(handle["uns"][key])
        except Exception as error:  # anndata raises many types for an entry it cannot decode
            raise DataError(f"uns[{key!r}] of {os.fspath(path)!r} cannot be read ({type(error).__name__}: "
                            f"{error})") from None


def read_anndata(adata_or_path, backed: bool = False):
    """An in-memory AnnData, from itself or from a ``.h5ad`` path (``DataError`` when the
    path is missing or not a readable ``.h5ad``); with ``backed``, a path is opened as a
    :class:`BackedAnnData` (counts stay on disk)."""
    check_source(adata_or_path)
    if isinstance(adata_or_path, (str, os.PathLike)):
        path = os.fspath(adata_or_path)
        import anndata

        try:
            return BackedAnnData(path) if backed else anndata.read_h5ad(path)
        except Exception as error:  # h5py / anndata raise many types for a bad file
            raise DataError(f"{path!r} is not a readable .h5ad file ({type(error).__name__}: {error}); "
                            "pass an AnnData written with adata.write_h5ad(...), and if it was downloaded "
                            "check that the download is complete") from None
    if backed:
        if getattr(adata_or_path, "isbacked", False) and getattr(adata_or_path, "filename", None):
            # read_h5ad(path, backed="r"): the counts from its file, obs and var as they are in memory now
            if getattr(adata_or_path, "is_view", False):
                raise DataError("a view of a backed AnnData (e.g. adata[:40]) cannot be registered backed: its "
                                "rows are not the file's; pass the whole backed AnnData (or its path) and select "
                                "cells afterwards, or load the view into memory (view.to_memory(), backed=False)")
            backed_file = read_anndata(adata_or_path.filename, backed=True)
            backed_file.obs, backed_file.var = adata_or_path.obs, adata_or_path.var
            return backed_file
        raise DataError("backed reading needs the path of a .h5ad file, not an in-memory AnnData; pass the path "
                        "(or backed=False)")
    return adata_or_path


def check_source(adata_or_path) -> None:
    """``DataError`` unless ``adata_or_path`` is an AnnData or the path of an existing file."""
    if isinstance(adata_or_path, (str, os.PathLike)):
        path = os.fspath(adata_or_path)
        if not path:
            raise DataError("no AnnData path given; set --config.data.path=/path/to/file.h5ad "
                            "(or pass the path to PerturbationData.from_anndata)")
        if not os.path.isfile(path):
            raise DataError(f"no file at {path!r}; give the path to an AnnData .h5ad file "
                            "(check the spelling and the working directory)")
    elif not all(hasattr(adata_or_path, field) for field in ("obs", "var", "X", "layers")):
        raise DataError(f"expected an AnnData or the path to a .h5ad file, got {type(adata_or_path).__name__}")


def _duplicated(index: pd.Index) -> list[str]:
    return index[index.duplicated()].unique().astype(str).tolist()


def check_names(adata) -> None:
    """Cells and genes present and uniquely named."""
    if adata.n_obs == 0:
        raise DataError("the AnnData has no cells (n_obs == 0); pass a file with cells")
    if adata.n_vars == 0:
        raise DataError("the AnnData has an empty gene set (n_vars == 0); pass a file with genes in var")
    duplicated = _duplicated(adata.var_names)
    if duplicated:
        raise DataError(f"{len(duplicated)} gene names occur more than once in var_names, e.g. "
                        f"{_show(duplicated)}; make them unique (adata.var_names_make_unique(), or index var "
                        "by gene id) before registering")
    duplicated = _duplicated(adata.obs_names)
    if duplicated:
        raise DataError(f"{len(duplicated)} cell names occur more than once in obs_names, e.g. "
                        f"{_show(duplicated)}; make them unique (adata.obs_names_make_unique())")


def check_genes(expected: Sequence[str], found: Sequence[str], model: bool = True) -> None:
    """``DataError`` naming the missing and extra genes when the two gene sets differ;
    ``expected`` are a trained model's genes (``model``) or the ``feature_names`` given to a
    registration."""
    expected_set, found_set = set(map(str, expected)), set(map(str, found))
    missing = [g for g in expected if g not in found_set]
    extra = [g for g in found if g not in expected_set]
    if missing or extra:
        reference = "genes the model was trained on" if model else "genes of feature_names"
        subset = "adata[:, predictor.feature_names]" if model else "adata[:, feature_names]"
        by_case = {name.casefold(): name for name in map(str, extra)}
        recased = [(name, by_case[name.casefold()]) for name in map(str, missing) if name.casefold() in by_case]
        case = f"; {len(recased)} of the missing genes are in the data in other letter case (e.g. " \
            f"{recased[0][1]!r} for {recased[0][0]!r}): rename them to the model's names" if recased else ""
        raise DataError(
            f"the genes of this AnnData differ from the {len(expected_set)} {reference}: "
            f"{len(missing)} missing {_show(missing)}, {len(extra)} extra {_show(extra)}{case}; subset it to those "
            f"genes ({subset}); missing genes cannot be imputed, so data without them needs a model trained on its "
            "own genes")


def select_genes(adata, use_highly_variable: bool = False, feature_names: Sequence[str] | None = None,
                 model: bool = False) -> np.ndarray:  # [G] int positions in var
    """Gene columns to use: all, or ``var["highly_variable"]`` ones; reordered to
    ``feature_names`` (a trained model's genes) when given, after checking the sets match
    (``model``: the error says they are a trained model's).
    With both, the model's genes are taken by name from all of var (other genes are left
    out, as the flags left them out in training; this AnnData's own flags are not read)."""
    if use_highly_variable and feature_names is not None:
        names = adata.var_names.astype(str)
        model_genes = set(map(str, feature_names))
        check_genes(list(feature_names), [g for g in names if g in model_genes], model=model)
        return pd.Index(names).get_indexer(list(map(str, feature_names)))
    columns = np.arange(adata.n_vars)
    if use_highly_variable:
        columns = np.flatnonzero(_highly_variable(adata.var))
        if len(columns) == 0:
            raise DataError("var['highly_variable'] selects no gene (empty gene set); recompute it or set "
                            "use_highly_variable=False")
    names = adata.var_names[columns].astype(str)
    if feature_names is not None:
        check_genes(list(feature_names), names.tolist(), model=model)
        columns = columns[pd.Index(names).get_indexer(list(feature_names))]
    return columns


def _highly_variable(var: pd.DataFrame) -> np.ndarray:  # [n_vars] bool
    """``var["highly_variable"]`` as booleans: a boolean column, or 0 / 1 without gaps."""
    if "highly_variable" not in var.columns:
        similar = [c for c in var.columns if "variable" in str(c).lower() or "hvg" in str(c).lower()]
        raise DataError("use_highly_variable is set but var has no 'highly_variable' column"
                        f"{f' (columns like it: {_show(similar)}; rename one)' if similar else ''}; var columns: "
                        f"{_show(var.columns, 20)}; compute it (scanpy.pp.highly_variable_genes) or set "
                        "use_highly_variable=False (--config.data.use_highly_variable=False)")
    column = var["highly_variable"]
    values = column.to_numpy()
    if (pd.api.types.is_bool_dtype(column) or pd.api.types.infer_dtype(column, skipna=False) == "boolean") \
            and not column.isna().any():  # booleans, also in an object column
        return values.astype(bool)
    if pd.api.types.is_numeric_dtype(column) and not column.isna().any() and np.isin(values, (0, 1)).all():
        return values.astype(bool)
    raise DataError(f"var['highly_variable'] must be boolean (or 0 / 1 without missing values); it has dtype "
                    f"{column.dtype} and values {_show([repr(v) for v in pd.unique(column.astype(object))], 5)}; "
                    "convert it, e.g. "
                    "adata.var['highly_variable'] = adata.var['highly_variable'].astype(str) == 'True'")


# -------------------------------------------------------------------------- conditions


@dataclasses.dataclass
class Conditions:
    """What each cell received."""

    labels: np.ndarray  # [n_cells] str: condition ("A", "A+B", guide_identity; the control label for controls)
    members: np.ndarray  # [n_cells, n_names] bool: the single perturbations each cell received
    names: list[str]  # [n_names] single-perturbation names, sorted
    # [n_cells] str: each condition's name as a perturbation of its own (encode_combinations="unique")
    # where it is not its label: guide columns give the members joined by the delimiter ("A+B")
    member_labels: np.ndarray | None = None
    # [n_cells] str: guide columns only, obs[perturbation_key] as given (guide_identity): the unique
    # encoding's names before member labels, still read from a vocabulary made of them (older checkpoints)
    identity_labels: np.ndarray | None = None

    def unique_labels(self, vocabulary: Sequence[str] | None = None) -> np.ndarray:  # [n_cells] str
        """Each cell's name as a perturbation of its own: ``member_labels`` where set, but the
        given labels where a ``vocabulary`` holds those and not the member labels."""
        if self.member_labels is None:
            return self.labels
        if vocabulary is not None and self.identity_labels is not None:
            known, perturbed = set(vocabulary), ~self.is_control
            if not set(self.member_labels[perturbed]) <= known and set(self.identity_labels[perturbed]) <= known:
                return self.identity_labels
        return self.member_labels

    @property
    def n_members(self) -> np.ndarray:  # [n_cells] int
        return self.members.sum(axis=1)

    @property
    def is_control(self) -> np.ndarray:  # [n_cells] bool
        return self.n_members == 0


def _control_test(control: str | None, control_match: str):
    if control_match not in CONTROL_MATCHES:
        raise DataError(f"control_match={control_match!r} is not allowed; choose one of {list(CONTROL_MATCHES)}")
    if control is None:
        return lambda label: False
    if control_match == "contains":
        return lambda label: control in label
    return lambda label: label == control


def _parse_label(label: str, is_control, delimiter: str | None, perturbation_key: str,
                 singles: frozenset[str] | None = None) -> tuple[str, ...]:
    """Sorted members of one label (``()`` for the control); members that are the control
    are dropped. A label that is the control as a whole is the control, unless ``singles``
    (given for ``control_match="contains"``: the labels that are not controls) holds one
    of its members: then it is a combination with control members (``"A+ctrl_2"`` is the
    single ``A`` where ``A`` occurs alone; ``"ctrl_1"`` with delimiter ``"_"`` stays a
    control)."""
    if is_control(label) and not (singles and delimiter and any(
            part.strip() in singles for part in label.split(delimiter))):
        return ()
    parts = [part.strip() for part in (label.split(delimiter) if delimiter else [label])]
    if "" in parts:
        raise DataError(f"the perturbation label {label!r} in obs[{perturbation_key!r}] has an empty member "
                        f"(delimiter {delimiter!r}); write singles as 'A' and pairs as 'A{delimiter}B', or set "
                        "delimiter to the separator the labels use")
    members = [part for part in parts if not is_control(part)]
    repeated = sorted({m for m in members if members.count(m) > 1})
    if repeated:
        raise DataError(f"the perturbation label {label!r} in obs[{perturbation_key!r}] names {repeated} more "
                        "than once; a combination lists each perturbation once")
    return tuple(sorted(members))


# obs columns that mark the papers' files: (column, which file, its configs)
PAPER_FILE_COLUMNS = (
    ("sgID_AB", "the Replogle et al. 2022 file", "configs/replogle.py, experiments/replogle"),
    ("guide_identity", "the curated Norman et al. 2019 file",
     "configs/norman_ood.py or configs/norman_data_efficiency.py, experiments/norman_ood"),
)


def _require_column(obs: pd.DataFrame, key: str, what: str, flag: str) -> pd.Series:
    if key not in obs.columns:
        looks_like = [f"; obs has the column {column!r} of {paper}, whose settings are in {where}"
                      for column, paper, where in PAPER_FILE_COLUMNS if column != key and column in obs.columns]
        raise DataError(f"obs has no column {key!r} ({what}); obs columns: {_show(obs.columns, 40)}; "
                        f"pass {flag.split('.')[-1]}=<column> (--config.{flag}=<column>){''.join(looks_like[:1])}")
    column = obs[key]
    if column.isna().any():
        cells = obs.index[column.isna().to_numpy()]
        raise DataError(f"{len(cells)} cells have no value in obs[{key!r}] ({what}), e.g. {_show(cells, 5)}; "
                        "label them or drop them")
    return column


def _labelled_conditions(obs, perturbation_key, control, control_match, delimiter, require_control) -> Conditions:
    column = _require_column(obs, perturbation_key, "the perturbation key", "data.perturbation_key")
    column = _label_strings(column)
    blank = column.str.strip().eq("").to_numpy()
    if blank.any():  # as for missing values: an empty label is no perturbation name, nor the control's
        cells = obs.index[blank]
        raise DataError(f"{len(cells)} cells have an empty label in obs[{perturbation_key!r}] (the perturbation key), "
                        f"e.g. {_show(cells, 5)}; label them (the control's label for unperturbed cells) or drop them")
    codes, uniques = pd.factorize(column)
    is_control = _control_test(control, control_match)
    singles = frozenset(label.strip() for label in uniques if not is_control(label)) \
        if control_match == "contains" else None
    parsed = [_parse_label(label, is_control, delimiter, perturbation_key, singles) for label in uniques]
    if require_control and control is not None and not any(len(members) == 0 for members in parsed):
        counts = column.value_counts()
        folded = [label for label in counts.index if str(label).casefold() == str(control).casefold()]
        close = folded or difflib.get_close_matches(str(control), [str(label) for label in counts.index], n=3)
        hint = f"did you mean {_show(close, 3)}? " if close else ""
        raise DataError(f"the control label {control!r} ({control_match} match) is absent from "
                        f"obs[{perturbation_key!r}]; {hint}labels seen (most frequent first): "
                        f"{_show(counts.index, 20)}; pass control=<label> (--config.data.control=<label>), "
                        "or control=None (--config.data.control='') for a screen without control cells (no ATEs then)")
    names = sorted({m for members in parsed for m in members})
    position = {name: i for i, name in enumerate(names)}
    unique_members = np.zeros((len(uniques), len(names)), dtype=bool)
    for row, members in enumerate(parsed):
        unique_members[row, [position[m] for m in members]] = True
    joiner = delimiter or ""
    unique_labels = np.array([joiner.join(m) if m else str(control) for m in parsed], dtype=object)
    return Conditions(labels=unique_labels[codes], members=unique_members[codes], names=names)


MISSING_LABELS = frozenset({"nan", "none", "na", "<na>", "null", "n/a", ""})  # casefolded
# names that usually mean control cells: ctrl, control, NT, neg(ative) ctrl, non-targeting, safe-targeting,
# scramble(d), each possibly numbered (non-targeting_2, NegCtrl0)
CONTROL_LIKE = re.compile(r"^(ctrl|control|nt|neg|negative|negctrl|neg[-_ ]?ctrl|neg[-_ ]?control|negative[-_ ]?control"
                          r"|non[-_ ]?targeting|safe[-_ ]?targeting|scrambled?)([-_ .]?\d+)?$", re.IGNORECASE)
SEPARATORS = ("+", "|", ";", ",", "_")  # characters that commonly join the members of a combination label


def _joins_singles(parts: list[str], singles: set[str], is_control) -> bool:
    """Whether ``parts`` are all labels of their own (or the control), two of them perturbations."""
    parts = [part.strip() for part in parts]
    return sum(part in singles for part in parts) >= 2 and all(part in singles or is_control(part) for part in parts)


def check_labels(obs: pd.DataFrame, conditions: Conditions, perturbation_key: str, control: str | None,
                 control_match: str, delimiter: str | None, encode_combinations: str) -> None:
    """:class:`DataWarning` for labels that the registration probably reads wrongly
    (training registrations of labelled conditions):

    * perturbation names that differ only in case or white space (``"KLF1"``, ``"klf1"``):
      separate perturbations;
    * names that look like missing values (``"nan"``, ``"None"``, ``"NA"``: what
      ``astype(str)`` makes of a gap) or like controls (``"NT"``, ``"non-targeting_2"``,
      ``"NegCtrl"``) but are not the control: learned as perturbations;

    * labels joined by a separator other than ``delimiter`` whose parts are all labels of
      their own, two of them perturbations (``"A+B"`` with ``delimiter=None`` when ``"A"``
      and ``"B"`` occur alone):
      each such combination would become a perturbation of its own;
    * with ``additive`` encoding, perturbations that never occur alone, only inside
      combinations (``"HLA+A"`` meant as one name): their separate effects are identified
      only through the combinations;
    * with ``control_match="contains"``, labels that contain the control only inside a
      longer name (``"T10"`` for the control ``"T1"``, ``"NTRK1"`` for ``"NT"``; numbered
      controls such as ``"ctrl1"`` are controls), which become control cells.
    """
    labels = pd.unique(_label_strings(obs[perturbation_key]))
    is_control = _control_test(control, control_match)
    by_folded: dict[str, list[str]] = {}
    for name in conditions.names:
        by_folded.setdefault(re.sub(r"\s+", "", name).casefold(), []).append(name)
    clashes = [" / ".join(names) for names in by_folded.values() if len(names) > 1]
    if clashes:
        warnings.warn(f"perturbation names that differ only in case or white space ({len(clashes)} sets), e.g. "
                      f"{_show(clashes[:3])}: each name is a perturbation of its own. If they are one, write them "
                      f"alike in obs[{perturbation_key!r}]", DataWarning, stacklevel=3)
    missing = [name for name in conditions.names if name.casefold() in MISSING_LABELS]
    if missing:
        warnings.warn(f"perturbation names {_show(missing)} look like missing values (what astype(str) makes of NaN "
                      f"or None), but are learned as perturbations; label these cells in obs[{perturbation_key!r}] "
                      "or drop them", DataWarning, stacklevel=3)
    control_like = [name for name in conditions.names if CONTROL_LIKE.match(name)]
    if control_like:
        which = f"the control is {control!r}" if control is not None else "the data have no control (control=None)"
        relabel = f"adata.obs[{perturbation_key!r}] = adata.obs[{perturbation_key!r}].astype(str).replace(" \
            f"{{{control_like[0]!r}: {control!r}}})" if control is not None else ""
        warnings.warn(f"perturbation names {_show(control_like)} look like control labels, but {which}: their cells "
                      "are learned as perturbations. If they are controls, give them the control label"
                      f"{' (' + relabel + ')' if relabel else ''}, or use control_match='contains' with a string "
                      "every control label contains", DataWarning, stacklevel=3)
    if control_match == "contains" and control:
        # inside a longer name: a letter or digit before it, a letter after it, or a digit after a control that
        # ends in one ("T10" for "T1"; "ctrl1" and "NegCtrl10" are numbered controls)
        after = "A-Za-z0-9" if control[-1].isdigit() else "A-Za-z"
        as_token = re.compile(rf"(?<![A-Za-z0-9]){re.escape(control)}(?![{after}])")
        inside = [label for label in labels if control in label and not as_token.search(label)]
        if inside:
            warnings.warn(f"labels of obs[{perturbation_key!r}] such as {_show(inside[:3])} ({len(inside)} in all) "
                          f"contain the control {control!r} only inside a longer name, and control_match='contains' "
                          "makes their cells control cells. If they are perturbations, set control_match='exact' "
                          "(--config.data.control_match=exact) or a control string that only control labels contain",
                          DataWarning, stacklevel=3)
    singles = {label.strip() for label in labels if not is_control(label)}
    for separator in SEPARATORS:
        if separator == delimiter:
            continue
        joined = [label for label in labels if _joins_singles(label.split(separator), singles, is_control)]
        if joined:
            warnings.warn(f"labels of obs[{perturbation_key!r}] such as {_show(joined[:3])} ({len(joined)} in all) "
                          f"join labels of their own with {separator!r}, but the delimiter is {delimiter!r}: each is "
                          f"registered as a perturbation of its own. If they are combinations, set "
                          f"delimiter={separator!r} (--config.data.delimiter={separator!r})", DataWarning, stacklevel=3)
            break
    if encode_combinations != "additive" or not delimiter:
        return
    n_members = conditions.members.sum(axis=1)
    alone = conditions.members[n_members == 1].any(axis=0)
    in_combination = conditions.members[n_members > 1].any(axis=0)
    never_alone = np.asarray(conditions.names)[in_combination & ~alone]
    if len(never_alone):
        raw = _label_strings(obs[perturbation_key]).to_numpy()
        examples = pd.unique(raw[conditions.members[:, in_combination & ~alone].any(axis=1)])
        warnings.warn(f"{len(never_alone)} perturbations occur only inside combinations, never alone: "
                      f"{_show(never_alone)} (in {_show(examples, 3)}); their separate effects are identified "
                      f"only through those combinations. If a name contains the delimiter {delimiter!r} (one "
                      "perturbation, not a combination), set delimiter to another separator or None",
                      DataWarning, stacklevel=3)


def _guide_column_conditions(obs, perturbation_key, control, pattern, delimiter: str | None = "+") -> Conditions:
    column = _require_column(obs, perturbation_key, "the condition names", "data.perturbation_key")
    excluded = set(NON_INDICATOR_COLUMNS) | {perturbation_key}
    columns = [c for c in obs.columns if pattern in str(c) and c not in excluded]
    if not columns:
        raise DataError(f"no obs column contains {pattern!r} (guide indicator columns); obs columns: "
                        f"{_show(obs.columns, 40)}; set guide_column_pattern='' "
                        "(--config.data.guide_column_pattern='') to read labels from obs[perturbation_key]")
    values = obs[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        raise DataError(f"guide indicator columns must hold 0 or 1; {_show(np.asarray(columns)[bad.any(0)])} "
                        "hold other values; fix them or set guide_column_pattern to match only indicator columns")
    names = [c[len(pattern):] if c.startswith(pattern) else c for c in map(str, columns)]
    order = np.argsort(names, kind="stable")
    members = values[:, order].astype(bool)
    labels = column.astype(str).to_numpy(dtype=object)
    control_label = "control" if control is None else control
    labels[members.sum(axis=1) == 0] = control_label
    names = [names[i] for i in order]
    patterns, inverse = np.unique(members, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    pattern_labels = np.asarray([(delimiter or "+").join(np.asarray(names, dtype=object)[row]) or control_label
                                 for row in patterns], dtype=object)
    # one condition label per set of members (its smallest guide_identity): a pair whose guides come in both
    # orders is one pair for the splits too; a file with one label per pair keeps its labels
    first = pd.Series(labels).groupby(inverse).min()
    return Conditions(labels=first.to_numpy(dtype=object)[inverse], members=members, names=names,
                      member_labels=pattern_labels[inverse], identity_labels=labels)


def parse_conditions(obs: pd.DataFrame, perturbation_key: str = "perturbation", control: str | None = "control",
                     control_match: str = "exact", delimiter: str | None = "+",
                     guide_column_pattern: str | None = None, require_control: bool = True) -> Conditions:
    """Each cell's condition and perturbations, from labels or guide indicator columns;
    ``require_control``: raise when no cell is a control (unless ``control`` is None).
    A non-string ``control`` (``0``) matches its string form (``"0"``)."""
    control = _label(control)
    if guide_column_pattern:
        conditions = _guide_column_conditions(obs, perturbation_key, control, guide_column_pattern, delimiter)
        control_like = [name for name in conditions.names if CONTROL_LIKE.match(name)]
        columns = f" The columns {_show([guide_column_pattern + n for n in control_like])} look like control " \
                  "guides, whose cells count as perturbed: drop them from obs, or rename them so that " \
                  "guide_column_pattern does not match them." if control_like else ""
        if require_control and control is not None and not conditions.is_control.any():
            raise DataError(f"no control cells: every cell has a guide column set ({guide_column_pattern!r} "
                            "columns); ATEs are measured against cells without a targeting guide. Add control "
                            f"cells, or pass control=None (--config.data.control=''; no ATEs then).{columns}")
        if control_like:
            warnings.warn(columns.strip(), DataWarning, stacklevel=3)
        return conditions
    return _labelled_conditions(obs, perturbation_key, control, control_match, delimiter, require_control)


def check_vocabulary(conditions: Conditions, vocabulary: Sequence[str], encode_combinations: str) -> None:
    """``DataError`` naming the perturbations (or pair members) outside a fixed vocabulary,
    e.g. a trained model's ``metadata["perturbation_names"]``."""
    known = set(vocabulary)
    if encode_combinations == "unique":
        labels = conditions.unique_labels(vocabulary)
        unknown = [label for label in pd.unique(labels[~conditions.is_control]) if label not in known]
        cells = np.isin(labels, unknown)
    else:
        unknown_columns = [i for i, name in enumerate(conditions.names) if name not in known]
        unknown = [conditions.names[i] for i in unknown_columns]
        cells = conditions.members[:, unknown_columns].any(axis=1)
    if unknown:
        control_like = [name for name in unknown if CONTROL_LIKE.match(name)]
        hint = f"; if {_show(control_like, 3)} are this file's control cells, register it with its control label " \
               f"(predictor.register(adata, control={control_like[0]!r}))" if control_like else ""
        raise DataError(f"{len(unknown)} perturbations are not in the vocabulary of {len(known)}: {_show(unknown)} "
                        f"(in conditions {_show(pd.unique(conditions.labels[cells]), 5)}); a model predicts only "
                        f"perturbations it was trained on: drop these cells, or train on data that contains them{hint}")


def encode_dosages(conditions: Conditions, encode_combinations: str = "additive",
                   vocabulary: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """``(dosages [n_cells, T] float32, names [T])``; control rows are all zeros."""
    if encode_combinations not in ENCODINGS:
        raise DataError(f"encode_combinations={encode_combinations!r} is not allowed; choose one of {list(ENCODINGS)}")
    if vocabulary is not None:
        check_vocabulary(conditions, vocabulary, encode_combinations)
    if encode_combinations == "additive":
        names = list(vocabulary) if vocabulary is not None else list(conditions.names)
        dosages = np.zeros((len(conditions.labels), len(names)), dtype=np.float32)
        dosages[:, pd.Index(names).get_indexer(conditions.names)] = conditions.members
        return dosages, names
    labels = conditions.unique_labels(vocabulary)
    names = list(vocabulary) if vocabulary is not None else sorted(pd.unique(labels[~conditions.is_control]))
    codes = pd.Index(names).get_indexer(labels)
    codes[conditions.is_control] = -1
    dosages = np.zeros((len(codes), len(names)), dtype=np.float32)
    rows = np.flatnonzero(codes >= 0)
    dosages[rows, codes[rows]] = 1.0
    return dosages, names
# ------------------------------------------------------------------------------ splits


def assign_splits(obs: pd.DataFrame, conditions: Conditions, split_key: str | None = None, task: str = "none",
                  split_seed: int = 0, frac_combinations_train: float = 1.0, frac_combinations_test: float = 0.25,
                  frac_combination_cells_train: float = 1.0) -> np.ndarray:  # [n_cells] str, "" = no split
    """Split label per cell: ``obs[split_key]`` when given, else the task's split
    (:mod:`sams_jax.data.splits`; ``"none"`` and ``"replogle"``: random 64 / 16 / 20)."""
    if task not in splits_lib.TASKS:
        raise DataError(f"task={task!r} is not allowed; choose one of {list(splits_lib.TASKS)}")
    if split_key:
        if task != "none":
            raise DataError(f"split_key={split_key!r} and task={task!r} both define the splits; "
                            "keep one (--config.data.split_key='' or --config.data.task=none)")
        column = _require_column(obs, split_key, "the split of each cell", "data.split_key").astype(str)
        unknown = sorted(set(column.unique()) - set(SPLITS))
        if unknown:
            raise DataError(f"obs[{split_key!r}] has values {_show(unknown)} besides {list(SPLITS)}; rename them "
                            f"to train / val / test, or drop split_key for a random 64/16/20 split")
        return column.to_numpy(dtype=object)
    try:
        if task == "norman_ood":
            _warn_pairs_in_both_orders(conditions)
            train_pairs, test_pairs = splits_lib.split_combinations(
                conditions.labels, conditions.n_members, frac_combinations_train, frac_combinations_test, split_seed)
            seen = set(train_pairs) & set(test_pairs)
            if seen and len(seen) < len(test_pairs):
                warnings.warn(f"data.frac_combinations_train={frac_combinations_train} makes {len(seen)} of the "
                              f"{len(test_pairs)} test pairs training pairs too, so the test split mixes pairs seen "
                              "in training with unseen ones; the OOD task keeps them apart up to "
                              f"frac_combinations_train={1 - frac_combinations_test:g} (1 - frac_combinations_test), "
                              "and at 1 every test pair is seen (the paper's fractions: 0, 0.25, 0.5, 0.75, 1)",
                              DataWarning, stacklevel=3)
            return splits_lib.norman_ood_split(conditions.labels, conditions.n_members, frac_combinations_train,
                                               frac_combinations_test, split_seed)
        if task == "norman_data_efficiency":
            return splits_lib.norman_data_efficiency_split(conditions.n_members, frac_combination_cells_train,
                                                           split_seed)
    except ValueError as error:
        raise DataError(f"task {task!r}: {error}; it needs cells with pairs (labels 'A+B', or two guide "
                        "columns set)") from None
    return splits_lib.random_split(len(obs), split_seed)


def _warn_pairs_in_both_orders(conditions: Conditions) -> None:
    """:class:`DataWarning` for pairs named by several ``guide_identity`` strings (guide
    columns; e.g. both orders of the guides): the OOD split draws pairs by their members,
    so such a pair counts once and its cells stay on one side; a split drawn over the
    distinct strings (as the paper's code may have done: SPEC 6 counts 132 distinct pairs)
    would count it once per string, which changes which pairs a seed holds out."""
    if conditions.identity_labels is None:
        return
    pair_cells = np.asarray(conditions.n_members) >= 2
    strings = pd.Series(conditions.identity_labels[pair_cells]).groupby(conditions.labels[pair_cells]).unique()
    several = [sorted(map(str, names)) for names in strings if len(names) > 1]
    if several:
        n_strings = len(strings) + sum(len(names) - 1 for names in several)
        are = "pair is" if len(several) == 1 else "pairs are"
        warnings.warn(f"{len(several)} {are} named by several labels of the condition column (e.g. {several[0]}); the "
                      f"OOD split counts each pair once ({len(strings)} pairs), so all its cells are held out or "
                      f"none; a split over the distinct labels would count {n_strings} pairs and hold out other "
                      "pairs for the same split_seed", DataWarning, stacklevel=4)


def warn_unused_split_column(obs: pd.DataFrame) -> None:
    """:class:`DataWarning` naming obs columns of train / val / test labels, for a training
    registration that splits the cells at random (no ``split_key``, no task)."""
    split_like = [str(name) for name in obs.columns if _holds_splits(obs[name])]
    if split_like:
        warnings.warn(f"obs column(s) {split_like} hold train / val / test labels but split_key is not set, so the cells "
                      f"get a random 64/16/20 split instead; to use the column, pass split_key={split_like[0]!r} "
                      f"(--config.data.split_key={split_like[0]})", DataWarning, stacklevel=3)


def _holds_splits(column: pd.Series) -> bool:
    """Whether an obs column's values are split labels (``train`` and at least one of
    ``val`` / ``test``, nothing else)."""
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        return False
    values = set(map(str, pd.unique(column.dropna())))
    return "train" in values and len(values) > 1 and values <= set(SPLITS)


# ------------------------------------------------------------------------------ counts


def _matrix(adata, counts_layer: str | None):
    if counts_layer:
        if counts_layer not in adata.layers:
            raw = " (adata.raw holds a matrix: if it is the raw counts, copy them into a layer, e.g. " \
                  "adata.layers['counts'] = adata.raw[:, adata.var_names].X)" if adata.raw is not None else ""
            raise DataError(f"the AnnData has no layer {counts_layer!r}; layers: {list(adata.layers.keys())}{raw}; "
                            "pass counts_layer=<layer> holding raw counts, or counts_layer=None "
                            "(--config.data.counts_layer='') to use X")
        return adata.layers[counts_layer]
    if adata.X is None:
        raise DataError("the AnnData has no X; pass counts_layer=<layer> holding the raw counts")
    return adata.X


def _all(positions: np.ndarray, n: int) -> bool:
    return len(positions) == n and np.array_equal(positions, np.arange(n))


def _gene_columns(matrix, columns: np.ndarray):
    """``matrix[:, columns]`` (every cell): CSR (sparse input), a :class:`BackedMatrix` view
    (backed input; nothing is read) or a dense array (a copy)."""
    every_column = _all(columns, matrix.shape[1])
    if isinstance(matrix, BackedMatrix):
        return matrix.subset(None, None if every_column else columns)
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix)
        if not matrix.has_canonical_format:  # duplicate entries (0.5 + 0.5) count as their sum, as scipy reads them
            matrix = matrix.copy()
            matrix.sum_duplicates()
        return matrix if every_column else matrix[:, columns]
    return np.asarray(matrix)[:, columns]


def _far_from_whole(matrix) -> bool:
    """Whether some value is not a count even up to rounding noise: more than 0.001 from a
    whole number, or a non-zero value within it of 0 (a second pass, on the error path only)."""
    def far(v):
        nearest = np.round(v)
        return np.isfinite(v) & ((np.abs(v - nearest) > 1e-3) | ((nearest == 0) & (v != 0)))

    return bool(matrix_lib.value_problems(matrix, {"far": far}))


def check_values(matrix, likelihood: str | None, cell_names: pd.Index,
                 what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """No NaN / inf; for count likelihoods no negative and no non-integer values.
    ``matrix``: ``[cells, genes]`` CSR, dense or backed, scanned one block of cells at a
    time (the non-zeros only for CSR). Returns, from the same pass, the row sums ``[cells]``
    and the number of non-zero values per cell ``[cells]`` and per gene ``[genes]``."""
    checks = {"NaN or infinite": lambda v: ~np.isfinite(v)}
    fixes = {"NaN or infinite": "remove those cells (or genes) or fix the upstream processing"}
    if likelihood in COUNT_LIKELIHOODS:
        fix = (f"the {likelihood!r} likelihood needs raw UMI counts: point counts_layer at them "
               "(--config.data.counts_layer=<layer>; often 'counts'), or use likelihood 'normal' for other values")
        checks["negative"] = lambda v: np.isfinite(v) & (v < 0)
        checks["non-integer"] = lambda v: np.isfinite(v) & (v != np.round(v))
        fixes.update(negative=fix, **{"non-integer": fix})
    found, sums, cell_nonzero, gene_nonzero = matrix_lib.scan_values(matrix, checks)
    for kind in checks:
        if kind in found:
            n_values, n_cells, cells, example = found[kind]
            more = f" ... (+{n_cells - len(cells)} more)" if n_cells > len(cells) else ""
            fix = fixes[kind]
            if kind == "non-integer" and not _far_from_whole(matrix):
                fix += (" (every one of them is within 0.001 of a non-zero whole number: counts that went through "
                        "a float conversion? round them before registering, e.g. np.rint(...) on the array, or on "
                        ".data of a sparse matrix)")
            raise DataError(f"{what} has {n_values} {kind} values (e.g. {example!r}) in {n_cells} cells, "
                            f"e.g. {[str(name) for name in cell_names[cells]]}{more}; {fix}")
    return sums, cell_nonzero, gene_nonzero


def check_empty(cell_nonzero: np.ndarray, gene_nonzero: np.ndarray, cell_names: Sequence[str],
                gene_names: Sequence[str], what: str, likelihood: str | None = None,
                library_size_key: str | None = None, genes: bool = True) -> None:
    """:class:`DataWarning` for cells without a non-zero value (empty droplets, failed
    cells) and, with ``genes``, for genes that are zero in every cell; ``cell_nonzero``
    ``[cells]`` and ``gene_nonzero`` ``[genes]`` count the non-zero values (see
    :func:`check_values`). Training stays finite (the ``library_nb`` mean has a floor), so
    these warn instead of raising."""
    empty_genes = np.flatnonzero(gene_nonzero == 0) if genes else np.zeros(0, np.int64)
    if len(empty_genes):
        warnings.warn(f"{len(empty_genes)} of {len(gene_names)} genes are zero in every cell of {what}: "
                      f"{_show(np.asarray(gene_names)[empty_genes])}; they carry no signal, so the model's "
                      "predicted effects on them are noise (and they cost time and memory): filter them out "
                      "before registering, keeping genes with a non-zero count in at least one cell "
                      "(e.g. scanpy.pp.filter_genes(adata, min_cells=1))", DataWarning, stacklevel=3)
    empty_cells = np.flatnonzero(cell_nonzero == 0)
    if len(empty_cells):
        library = (", and with the 'library_nb' likelihood their library size (total count) is 0, so the model "
                   "predicts zero counts for them whatever their latent state" if likelihood == "library_nb"
                   and not library_size_key else "")
        warnings.warn(f"{len(empty_cells)} of {len(cell_names)} cells have no non-zero value in {what} (total count "
                      f"0), e.g. {_show(np.asarray(cell_names)[empty_cells], 5)}; they are empty (no signal about "
                      f"their perturbation){library}: drop them before registering, keeping cells with a non-zero "
                      "count (e.g. scanpy.pp.filter_cells(adata, min_genes=1))", DataWarning, stacklevel=3)


NORMALISED_SPREAD = 0.05  # check_not_normalised: total counts all within this fraction of their median


def check_not_normalised(row_sums: np.ndarray, what: str, likelihood: str) -> None:
    """:class:`DataWarning` when every cell's total count over the modelled genes
    (``row_sums`` ``[cells]``, 20 or more cells) lies within ``NORMALISED_SPREAD`` of the
    median: values normalised to a fixed total (CP10k, then rounded) pass the integer
    check, but raw UMI counts vary several-fold between cells. Counts downsampled to a
    fixed depth also warn (the message says to ignore it then); normalised values restricted
    to some genes (highly variable ones) do not."""
    row_sums = np.asarray(row_sums, dtype=np.float64).reshape(-1)
    median = float(np.median(row_sums)) if len(row_sums) else 0.0
    if len(row_sums) < 20 or median <= 0:
        return
    low, high = float(row_sums.min()), float(row_sums.max())
    if high - low <= NORMALISED_SPREAD * median:
        warnings.warn(f"every cell's total count in {what} (over the modelled genes) lies between {low:g} and "
                      f"{high:g} (within {NORMALISED_SPREAD:.0%} of {median:g}): these look normalised to a fixed "
                      "total (e.g. CP10k, then rounded), not raw UMI counts, whose totals vary several-fold between "
                      f"cells; the {likelihood!r} likelihood needs raw counts: point counts_layer at them "
                      "(--config.data.counts_layer=<layer>; often 'counts'). Counts downsampled to a fixed depth "
                      "are raw counts: then ignore this", DataWarning, stacklevel=3)


LIBRARY_SIZE_RATIO_WARNING = 1.5  # library_sizes: a given column above this median multiple of the row sums warns


def library_sizes(obs: pd.DataFrame, row_sums: np.ndarray, library_size_key: str | None,
                  counts: bool = False) -> np.ndarray:
    """``[n_cells]`` float32: ``obs[library_size_key]`` when given, else ``row_sums`` (the
    counts' row sums, from :func:`check_values`' pass). ``counts``: the matrix holds
    counts (count likelihoods), so a given library size below a cell's row sum (a total
    count below the counts of some of its genes: log-scaled or normalised values) is an
    error."""
    row_sums = np.asarray(row_sums, dtype=np.float64).reshape(-1)
    if not library_size_key:
        return row_sums.astype(np.float32)
    column = _require_column(obs, library_size_key, "library sizes", "data.library_size_key")
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values) & (values > 0)):
        raise DataError(f"obs[{library_size_key!r}] must hold positive finite library sizes; "
                        f"{int((~(np.isfinite(values) & (values > 0))).sum())} cells do not; fix them, or drop "
                        "library_size_key to use the row sums of the counts")
    below = np.flatnonzero(values + 0.5 < row_sums) if counts else []
    if len(below):
        cell = below[0]
        raise DataError(f"obs[{library_size_key!r}] is smaller than the cell's summed counts of the modelled genes in "
                        f"{len(below)} cells (e.g. {obs.index[cell]}: {values[cell]:g} < {row_sums[cell]:g}); a "
                        "library size counts at least the modelled genes' counts, so it cannot be smaller (is the "
                        "column log-scaled or normalised?); fix it, or drop library_size_key to use the row sums "
                        "of the counts")
    expressed = row_sums > 0
    ratio = float(np.median(values[expressed] / row_sums[expressed])) if counts and expressed.any() else 1.0
    if ratio > LIBRARY_SIZE_RATIO_WARNING:
        warnings.warn(f"obs[{library_size_key!r}] is a median {ratio:.2g}x the cells' summed counts of the "
                      "modelled genes: a library size over more genes (e.g. the whole transcriptome before genes "
                      "were selected)? The count likelihoods' expected counts over the modelled genes sum to the "
                      "library size, so the model would expect that many more counts (a worse fit; sampled cells "
                      "with larger totals than the data's); drop library_size_key to use the row sums of the "
                      "modelled genes (the paper's), or ignore this for size factors meant so", DataWarning,
                      stacklevel=3)
    return values.astype(np.float32)


# -------------------------------------------------------------------------- entry points


def from_anndata(adata_or_path, perturbation_key: str = "perturbation", control: str | None = "control",
                 delimiter: str | None = "+", counts_layer: str | None = "counts", split_key: str | None = None,
                 library_size_key: str | None = None, encode_combinations: str = "additive", *,
                 control_match: str = "exact", guide_column_pattern: str | None = None,
                 use_highly_variable: bool = False, task: str = "none", split_seed: int = 0,
                 frac_combinations_train: float = 1.0, frac_combinations_test: float = 0.25,
                 frac_combination_cells_train: float = 1.0, likelihood: str | None = "library_nb",
                 perturbations: Sequence[str] | None = None, feature_names: Sequence[str] | None = None,
                 name: str | None = None, backed: bool = False, for_training: bool = True,
                 gene_symbols_key: str | None = None) -> PerturbationData:
    """Register an AnnData (or a ``.h5ad`` path) as :class:`PerturbationData`.

    Cells: ``x`` ``[n_cells, n_genes]`` float32 from ``layers[counts_layer]`` (or ``X``):
    a CSR matrix when stored sparse, a dense array when stored dense, and with ``backed``
    (a path, or an AnnData opened with ``read_h5ad(path, backed="r")``: its ``obs`` and
    ``var`` as they are in memory, not a view) a :class:`~sams_jax.data.matrix.BackedMatrix`
    read from the file on demand; ``dosages`` ``[n_cells, n_perturbations]`` (see the module docstring);
    ``split`` from ``obs[split_key]`` or the ``task`` (cells outside every split of the
    task are kept with split ``""``: no training or scoring uses them, the data ATEs do);
    ``library_size`` ``[n_cells]`` = row sums unless
    ``library_size_key``. ``likelihood`` selects the value checks (counts for
    ``poisson`` / ``library_nb``; ``None`` checks finiteness only). ``perturbations`` and
    ``feature_names`` fix the vocabulary and gene order (e.g. a trained model's metadata)
    and raise when the data do not fit them. A non-string ``control``, ``perturbations``
    or ``feature_names`` entry (``control=0``) matches its string form (``"0"``). Cells
    without a non-zero count, and genes zero in every cell, give a :class:`DataWarning`.
    ``for_training=False`` registers data to be scored by a trained model rather than
    trained on (``Predictor.register``): the checks that concern training only are
    skipped, namely control cells present and in the training split, perturbations
    without or with few training cells, and all-zero genes (the splits are still assigned by
    ``split_key`` / ``task``, whose own requirements still apply). The registration is kept in
    ``data.registration`` and saved with checkpoints. ``gene_symbols_key``: a ``var``
    column of display names (gene symbols where ``var_names`` are Ensembl IDs), carried
    to the outputs (``var["gene_symbol"]`` of ATEs and generated cells); missing entries
    fall back to the gene's name.
    """
    if likelihood is not None and likelihood not in KNOWN_LIKELIHOODS:
        raise DataError(f"likelihood={likelihood!r} is not allowed; choose one of {list(KNOWN_LIKELIHOODS)} (it "
                        "selects the value checks: counts for the count likelihoods), or None to check finiteness "
                        "only")
    control, perturbations, feature_names = _label(control), _labels(perturbations), _labels(feature_names)
    if control is not None and perturbations is not None and control in perturbations and not guide_column_pattern:
        raise DataError(f"the control label {control!r} is a perturbation of the vocabulary (a model measured against "
                        "one of its perturbations, as the simulations are against '0'), so its cells would be read as "
                        f"unperturbed; register with control=None to give them {control!r}'s row")
    adata = read_anndata(adata_or_path, backed)
    check_names(adata)
    columns = select_genes(adata, use_highly_variable, feature_names)
    conditions = parse_conditions(adata.obs, perturbation_key, control, control_match, delimiter,
                                  guide_column_pattern, require_control=for_training)
    dosages, perturbation_names = encode_dosages(conditions, encode_combinations, perturbations)
    if for_training and not guide_column_pattern:
        check_labels(adata.obs, conditions, perturbation_key, control, control_match, delimiter,
                     encode_combinations)
    split = assign_splits(adata.obs, conditions, split_key, task, split_seed, frac_combinations_train,
                          frac_combinations_test, frac_combination_cells_train)
    if for_training and not split_key and task == "none":
        warn_unused_split_column(adata.obs)
    # cells in no split of the task (Norman's left-out pair cells) stay, with split "": no training or
    # scoring uses them, the data ATEs do (SPEC 5: the mean over all cells that received an intervention)
    obs = adata.obs
    counts = _gene_columns(_matrix(adata, counts_layer), columns)
    what = f"layers[{counts_layer!r}]" if counts_layer else "X"
    sums, cell_nonzero, gene_nonzero = check_values(counts, likelihood, obs.index, what)
    gene_names = adata.var_names[columns].astype(str).tolist()
    gene_symbols = _gene_symbols(adata.var, gene_symbols_key, columns, gene_names)
    check_empty(cell_nonzero, gene_nonzero, obs.index.astype(str), gene_names, what, likelihood, library_size_key,
                genes=for_training)
    library_size = library_sizes(obs, sums, library_size_key, counts=likelihood in COUNT_LIKELIHOODS)
    if likelihood in COUNT_LIKELIHOODS and not library_size_key:
        check_not_normalised(sums, what, likelihood)
    if isinstance(counts, BackedMatrix):
        x = counts
    elif sp.issparse(counts):  # a copy unless read from a file here (the caller's AnnData stays untouched)
        x = sp.csr_matrix(counts, dtype=np.float32, copy=not isinstance(adata_or_path, (str, os.PathLike)))
    else:
        x = np.asarray(counts, dtype=np.float32)
    data = PerturbationData(
        x=x,
        dosages=dosages,
        split=split.astype(str),
        feature_names=gene_names,
        perturbation_names=perturbation_names,
        library_size=library_size,
        control=control,
        feature_symbols=gene_symbols,
        name=name or (os.path.splitext(os.path.basename(os.fspath(adata_or_path)))[0]
                      if isinstance(adata_or_path, (str, os.PathLike)) else "anndata"),
        registration=dict(
            perturbation_key=perturbation_key, control=control, control_match=control_match, delimiter=delimiter,
            guide_column_pattern=guide_column_pattern, counts_layer=counts_layer, split_key=split_key,
            library_size_key=library_size_key, encode_combinations=encode_combinations,
            use_highly_variable=use_highly_variable, task=task, split_seed=split_seed,
            frac_combinations_train=frac_combinations_train, frac_combinations_test=frac_combinations_test,
            frac_combination_cells_train=frac_combination_cells_train, gene_symbols_key=gene_symbols_key),
    )
    if for_training:
        _check_training_coverage(data, conditions.is_control)
    return data


def _gene_symbols(var: pd.DataFrame, key: str | None, columns: np.ndarray,
                  gene_names: list[str]) -> list[str] | None:
    """``var[key]`` of the selected genes as strings (a missing entry: the gene's name), or
    None without a key."""
    if not key:
        return None
    if key not in var.columns:
        raise DataError(f"var has no column {key!r} (each gene's display name, e.g. its symbol); var columns: "
                        f"{_show(var.columns, 40)}; pass gene_symbols_key=<column> (--config.data.gene_symbols_key="
                        "<column>), or an empty one to use var_names (--config.data.gene_symbols_key='')")
    values = var[key].iloc[columns]
    return [name if pd.isna(value) or str(value) == "" else _symbol_text(value)
            for value, name in zip(values, gene_names)]


def _symbol_text(value) -> str:
    """A display name as text; a whole float (a numeric ID column that pandas stored as
    float because of missing entries, e.g. Entrez IDs) without its ``.0``."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


FEW_TRAINING_CELLS = 5  # _check_training_coverage: fewer training cells than this are warned about


def _check_training_coverage(data: PerturbationData, is_control: np.ndarray) -> None:
    """Control cells in the training split (ATEs need them); warnings for perturbations
    without training cells (their embeddings stay at the prior, so their model ATEs are the prior's)
    and for those with fewer than ``FEW_TRAINING_CELLS``."""
    if data.control is not None and not (is_control & (data.split == "train")).any():
        per_split = {s: int((is_control & (data.split == s)).sum()) for s in SPLITS}
        raise DataError(f"no control cells ({data.control!r}) in the training split (control cells per split: "
                        f"{per_split}); ATEs are measured against the control, so the model must see it: put "
                        "control cells in the training split, or pass control=None (--config.data.control='') "
                        "for a screen without controls")
    names, trained_cells = np.asarray(data.perturbation_names), data.cells_per_perturbation("train")
    untrained = names[trained_cells == 0]
    if len(untrained):
        warnings.warn(f"{len(untrained)} perturbations have no training cells: {_show(untrained)}; their effects "
                      "are not learned (they stay at the prior), so their model ATEs are the prior's (evaluate "
                      "counts them in the ATE metrics, as the paper does; --ate-metrics-over learned leaves them "
                      "out)",
                      DataWarning, stacklevel=3)
    few = (trained_cells > 0) & (trained_cells < FEW_TRAINING_CELLS)
    if few.any():
        shown = [f"{name} ({count})" for name, count in zip(names[few], trained_cells[few])]
        warnings.warn(f"{int(few.sum())} perturbations have fewer than {FEW_TRAINING_CELLS} training cells: "
                      f"{_show(shown)}; their learned effects rest on very few cells, so read their ATEs with care",
                      DataWarning, stacklevel=3)


def check_compatible(metadata: dict[str, Any], adata_or_path) -> None:
    """``DataError`` when an evaluation AnnData does not fit a trained model's
    ``metadata``: genes missing or extra (after the registration's gene selection;
    order may differ) or perturbations outside the vocabulary."""
    adata = read_anndata(adata_or_path)
    check_names(adata)
    registration = metadata.get("registration") or {}
    select_genes(adata, registration.get("use_highly_variable", False), metadata["feature_names"], model=True)
    if registration:
        conditions = parse_conditions(adata.obs, registration["perturbation_key"], registration["control"],
                                      registration["control_match"], registration["delimiter"],
                                      registration["guide_column_pattern"], require_control=False)
        check_vocabulary(conditions, metadata["perturbation_names"], registration["encode_combinations"])


NORMAN_URL = "https://ndownloader.figshare.com/files/34027562"
REPLOGLE_RAW_URL = "https://plus.figshare.com/ndownloader/files/35775507"
_WHERE_TO_GET = {
    "norman_ood": f"download the curated Norman et al. 2019 file of the sc-pert collection ({NORMAN_URL})",
    "norman_data_efficiency": f"download the curated Norman et al. 2019 file of the sc-pert collection ({NORMAN_URL})",
    "replogle": (f"download K562_gwps_raw_singlecell_01.h5ad ({REPLOGLE_RAW_URL}, about 60 GB) and filter it with "
                 "python -m sams_jax.data.prepare_replogle K562_gwps_raw_singlecell_01.h5ad replogle.h5ad"),
}


LAYOUT_SAMPLE_CELLS = 2_000  # check_layout: the cells whose values it reads


def check_layout(data_config, likelihood: str | None = None) -> None:
    """``DataError`` when the ``.h5ad`` file of ``config.data`` does not have the layout
    the config registers (missing file or obs column, control label, malformed labels,
    counts layer, split values, highly variable genes, duplicated names), found from its
    ``obs`` and ``var``, and, given a count ``likelihood``, when the first
    ``LAYOUT_SAMPLE_CELLS`` cells' values are not counts (normalised data): a quick check
    before many runs of an experiment start (their registration checks every value).
    Every problem found is in the one error (a file in another layout has several)."""
    path, settings = _registration_settings(data_config)
    adata = read_anndata(path, backed=True)
    problems: list[str] = []

    def attempt(check: Callable[[], Any]):
        try:
            return check()
        except DataError as error:
            problems.append(str(error))
            return None

    attempt(lambda: check_names(adata))
    attempt(lambda: select_genes(adata, settings["use_highly_variable"], None))
    conditions = attempt(lambda: parse_conditions(
        adata.obs, settings["perturbation_key"], _label(settings["control"]), settings["control_match"],
        settings["delimiter"], settings["guide_column_pattern"]))
    if conditions is not None:
        attempt(lambda: encode_dosages(conditions, settings["encode_combinations"]))
        attempt(lambda: assign_splits(adata.obs, conditions, settings["split_key"], settings["task"],
                                      settings["split_seed"], settings["frac_combinations_train"],
                                      settings["frac_combinations_test"], settings["frac_combination_cells_train"]))
    if settings["library_size_key"]:
        attempt(lambda: _require_column(adata.obs, settings["library_size_key"], "each cell's library size",
                                        "data.library_size_key"))
    if settings["gene_symbols_key"]:
        attempt(lambda: _gene_symbols(adata.var, settings["gene_symbols_key"], np.arange(0), []))
    layer = settings["counts_layer"]
    if layer and layer not in adata.layers or not layer and not adata._has_x:
        attempt(lambda: _matrix(adata, layer))  # its error names the layers there are
    elif likelihood in COUNT_LIKELIHOODS:  # normalised values would fail every run, each after reading the file
        sample = np.arange(min(LAYOUT_SAMPLE_CELLS, adata.n_obs))
        attempt(lambda: check_values(_matrix(adata, layer).subset(sample), likelihood, adata.obs_names[sample],
                                     f"{'layer ' + repr(layer) if layer else 'X'} (its first {len(sample):,} cells)"))
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{path} is not in the layout that config.data registers ({len(problems)} problems; a file "
                        "made for another experiment?):\n- " + "\n- ".join(problems))


def _registration_settings(data_config) -> tuple[str, dict]:
    """``(path, from_anndata keyword arguments)`` from the fields of ``config.data``
    (``""`` means unset); ``DataError`` for an empty path."""
    if not data_config.path:
        where = _WHERE_TO_GET.get(data_config.task, "point it at your .h5ad file")
        raise DataError(f"data.path is empty: set --config.data.path=/path/to/file.h5ad; {where}")
    return data_config.path, dict(
        perturbation_key=data_config.perturbation_key,
        control=data_config.control or None,
        delimiter=data_config.delimiter or None,
        counts_layer=data_config.counts_layer or None,
        split_key=data_config.split_key or None,
        library_size_key=data_config.library_size_key or None,
        encode_combinations=data_config.encode_combinations,
        control_match=data_config.control_match,
        guide_column_pattern=data_config.guide_column_pattern or None,
        use_highly_variable=data_config.use_highly_variable,
        task=data_config.task,
        split_seed=data_config.split_seed,
        frac_combinations_train=data_config.frac_combinations_train,
        frac_combinations_test=data_config.frac_combinations_test,
        frac_combination_cells_train=data_config.frac_combination_cells_train,
        gene_symbols_key=data_config.get("gene_symbols_key") or None,
    )


def from_config(data_config, likelihood: str | None = None) -> PerturbationData:
    """:func:`from_anndata` with the fields of ``config.data`` (``""`` means unset)."""
    path, settings = _registration_settings(data_config)
    return from_anndata(path, **settings, likelihood=likelihood, backed=bool(data_config.get("backed", False)))


def write_h5ad(adata, path) -> None:
    """``adata.write_h5ad(path)``, also under pandas >= 3, whose default string columns
    anndata writes only when asked to (``allow_write_nullable_strings``)."""
    import anndata

    with anndata.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(path)
