"""AnnData in: registration, validation, the paper's splits, the Replogle filter, configs,
and training end to end on a small synthetic screen written to disk."""

import inspect
import itertools
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import warnings

import anndata
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sams_jax.config import ConfigError, validate_config
from sams_jax.data import DataError, PerturbationData, load_data, metadata_differences
from sams_jax.data import splits as splits_lib
from sams_jax.data.anndata_io import DataWarning, check_compatible, from_anndata, write_h5ad
from sams_jax.data.prepare_replogle import load_filter, prepare_replogle

ROOT = pathlib.Path(__file__).resolve().parents[1]
SINGLES = list("ABCDEF")
PAIRS = [f"{a}+{b}" for a, b in itertools.combinations(SINGLES, 2)][:10]


def make_screen(labels=None, n_genes=12, seed=0, sparse=True) -> anndata.AnnData:
    """Counts in layers["counts"] (CSR), log1p in X, labels in obs["perturbation"];
    by default 30 control cells, 10 per single and 10 per pair (10 pairs)."""
    if labels is None:
        labels = ["control"] * 30 + [c for c in SINGLES + PAIRS for _ in range(10)]
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, (len(labels), n_genes)).astype(np.float32)
    obs = pd.DataFrame({"perturbation": labels}, index=[f"cell{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)])
    layer = sp.csr_matrix(counts) if sparse else counts
    return anndata.AnnData(X=np.log1p(counts), obs=obs, var=var, layers={"counts": layer})


def make_norman_like(adata: anndata.AnnData) -> anndata.AnnData:
    """The curated Norman layout: one 0/1 ``guide_<gene>`` column per gene, ``guide_ids``,
    ``guide_identity`` naming the condition, ``var["highly_variable"]``; no label column."""
    out = adata.copy()
    labels = out.obs.pop("perturbation").astype(str)
    for gene in SINGLES:
        out.obs[f"guide_{gene}"] = [int(gene in label.split("+")) for label in labels]
    out.obs["guide_ids"] = [",".join(label.split("+")) if label != "control" else "" for label in labels]
    guides = [("NegCtrl0", "NegCtrl0") if label == "control" else tuple((label.split("+") * 2)[:2])
              for label in labels]  # "A" -> A_A__A_A, "A+B" -> A_B__A_B
    out.obs["guide_identity"] = ["_".join(pair) + "__" + "_".join(pair) for pair in guides]
    out.var["highly_variable"] = np.arange(out.n_vars) % 3 != 0
    return out


def counts_of(adata) -> np.ndarray:
    return np.asarray(adata.layers["counts"].toarray() if sp.issparse(adata.layers["counts"])
                      else adata.layers["counts"])


# ------------------------------------------------------------------------ registration


def test_registration_dosages_vocabulary_library_sizes_and_split():
    adata = make_screen()
    adata.obs.loc["cell0", "perturbation"] = "control"
    adata.obs.loc["cell30", "perturbation"] = "A+control"  # a control member is dropped: the single A
    adata.obs.loc["cell100", "perturbation"] = "B+A"  # members are sorted: the pair A+B
    data = PerturbationData.from_anndata(adata, perturbation_key="perturbation", control="control")
    assert data.perturbation_names == SINGLES
    assert data.feature_names == list(adata.var_names) and data.control == "control"
    assert sp.isspmatrix_csr(data.x) and data.x.dtype == np.float32  # a sparse layer stays sparse
    np.testing.assert_array_equal(data.x.toarray(), counts_of(adata))  # the counts layer, not X
    np.testing.assert_allclose(data.library_size, counts_of(adata).sum(1))
    labels = adata.obs["perturbation"].to_numpy()
    for i, label in enumerate(labels):
        members = {"A+control": {"A"}, "B+A": {"A", "B"}, "control": set()}.get(label, set(label.split("+")))
        expected = np.array([name in members for name in SINGLES], dtype=np.float32)
        np.testing.assert_array_equal(data.dosages[i], expected, err_msg=label)
    # random 64 / 16 / 20 of the authors' code: floor(0.8 n) train+val, then floor(0.8 of that) train
    n = adata.n_obs
    n_train_val = math.floor(0.8 * n)
    assert (data.split == "test").sum() == n - n_train_val
    assert (data.split == "train").sum() == math.floor(0.8 * n_train_val)
    assert data.metadata("log_standardize")["registration"]["perturbation_key"] == "perturbation"
    # a different split seed moves cells, the same seed does not
    assert np.array_equal(from_anndata(adata).split, data.split)
    assert not np.array_equal(from_anndata(adata, split_seed=1).split, data.split)


def test_unique_encoding_makes_each_pair_a_perturbation():
    data = from_anndata(make_screen(), encode_combinations="unique")
    assert data.perturbation_names == sorted(SINGLES + PAIRS)
    # guide columns (the Norman layout) name each condition by its members, as labels do, not by its
    # guide_identity: the same names and dosages
    norman = make_norman_like(make_screen())
    norman.obs.loc[norman.obs["guide_identity"] == "A_B__A_B", "guide_identity"] = "B_A__B_A"  # order of guides
    from_guides = from_anndata(norman, guide_column_pattern="guide_", perturbation_key="guide_identity",
                               encode_combinations="unique", counts_layer="counts")
    assert from_guides.perturbation_names == data.perturbation_names
    np.testing.assert_array_equal(from_guides.dosages, data.dosages)
    # a vocabulary of guide_identity strings (checkpoints before the member names) is still read
    identities = sorted(set(norman.obs["guide_identity"][norman.obs["guide_ids"] != ""]))
    old = from_anndata(norman, guide_column_pattern="guide_", perturbation_key="guide_identity",
                       encode_combinations="unique", counts_layer="counts", perturbations=identities)
    assert old.perturbation_names == identities
    np.testing.assert_array_equal(old.dosages[:, identities.index("B_A__B_A")],
                                  from_guides.dosages[:, from_guides.perturbation_names.index("A+B")])
    # the OOD split draws pairs by their members: both orders of a pair's guides land on the same side
    half = norman.obs_names[(norman.obs["guide_identity"] == "B_A__B_A").to_numpy()][:5]
    norman.obs.loc[half, "guide_identity"] = "A_B__A_B"
    for seed in range(4):
        with pytest.warns(DataWarning, match=r"1 pair is named by several labels of the condition column \(e.g. "
                          r"\['A_B__A_B', 'B_A__B_A'\]\); the OOD split counts each pair once \(\d+ pairs\)"):
            ood = from_anndata(norman, guide_column_pattern="guide_", perturbation_key="guide_identity",
                               counts_layer="counts", task="norman_ood", frac_combinations_train=0.5, split_seed=seed)
        pair = ood.dosages[:, ood.perturbation_names.index("A")].astype(bool) & \
            ood.dosages[:, ood.perturbation_names.index("B")].astype(bool)
        in_split = pair & (ood.split != "")  # cells the task leaves out stay, with split ""
        assert len(set(ood.split[in_split] == "test")) <= 1  # all A+B cells of a split in test, or none
    labels = make_screen().obs["perturbation"].to_numpy()
    column = {name: i for i, name in enumerate(data.perturbation_names)}
    assert np.all(data.dosages.sum(1) == (labels != "control"))  # one non-zero, none for control
    for i in np.flatnonzero(labels != "control"):
        assert data.dosages[i, column[labels[i]]] == 1.0


def test_split_key_path_input_and_library_size_key(tmp_path):
    adata = make_screen(sparse=False)
    adata.obs["split"] = np.array(["train", "val", "test"])[np.arange(adata.n_obs) % 3]
    adata.obs["split"] = np.where(adata.obs["perturbation"] == "control", "train", adata.obs["split"])
    totals = counts_of(adata).sum(1)
    adata.obs["n_counts"] = totals + np.arange(adata.n_obs) % 4  # genes not in the file count too
    path = tmp_path / "screen.h5ad"
    write_h5ad(adata, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # a little above the row sums: no warning
        data = PerturbationData.from_anndata(str(path), split_key="split", library_size_key="n_counts")
    np.testing.assert_array_equal(data.split, adata.obs["split"].to_numpy())
    np.testing.assert_array_equal(data.library_size, totals + np.arange(adata.n_obs) % 4)
    assert data.name == "screen"
    # a whole-transcriptome total (3x the modelled genes' counts) would inflate the expected counts
    adata.obs["total_counts"] = 3.0 * totals
    with pytest.warns(DataWarning, match=r"obs\['total_counts'\] is a median 3x the cells' summed counts of the "
                                         r"modelled genes.*drop library_size_key"):
        from_anndata(adata, split_key="split", library_size_key="total_counts", likelihood="library_nb")
    # counts: a library size is a total count, never below the counts of the genes modelled
    adata.obs["n_counts"] = np.log1p(totals)
    from_anndata(adata, split_key="split", library_size_key="n_counts", likelihood="normal")  # values, not counts: not checked
    with pytest.raises(DataError, match=rf"obs\['n_counts'\] is smaller than the cell's summed counts.*in "
                                        rf"{adata.n_obs} cells \(e.g. cell0: {np.log1p(totals[0]):g} < {totals[0]:g}\)"
                                        r".*log-scaled"):
        from_anndata(adata, split_key="split", library_size_key="n_counts", likelihood="library_nb")


def test_guide_columns_of_the_curated_norman_file_equal_the_labels():
    adata = make_screen()
    norman = make_norman_like(adata)
    by_labels = from_anndata(adata, task="norman_ood", frac_combinations_train=0.5)
    by_guides = from_anndata(norman, perturbation_key="guide_identity", guide_column_pattern="guide_",
                             task="norman_ood", frac_combinations_train=0.5)
    assert by_guides.perturbation_names == SINGLES  # "guide_" stripped, guide_ids / guide_identity excluded
    np.testing.assert_array_equal(by_guides.dosages, by_labels.dosages)
    np.testing.assert_array_equal(by_guides.split, by_labels.split)  # one pair label <-> one guide_identity
    hvg = from_anndata(norman, perturbation_key="guide_identity", guide_column_pattern="guide_",
                       use_highly_variable=True)
    assert hvg.feature_names == [g for i, g in enumerate(adata.var_names) if i % 3 != 0]
    np.testing.assert_allclose(hvg.library_size, np.asarray(hvg.x.sum(1)).ravel())  # of the genes modelled


def test_highly_variable_flags_are_checked_and_a_models_genes_taken_by_name():
    adata = make_screen()
    kept = [g for i, g in enumerate(adata.var_names) if i % 3 != 0]
    adata.var["highly_variable"] = (np.arange(adata.n_vars) % 3 != 0).astype(int)  # 0 / 1 works
    assert from_anndata(adata, use_highly_variable=True).feature_names == kept
    adata.var["highly_variable"] = pd.Series([i % 3 != 0 for i in range(adata.n_vars)], dtype=object,
                                             index=adata.var_names)  # Python booleans in an object column
    assert from_anndata(adata, use_highly_variable=True).feature_names == kept
    for flags in (np.where(np.arange(adata.n_vars) % 3 != 0, "True", "False"),  # strings: all truthy
                  np.where(np.arange(adata.n_vars) % 3 != 0, 1.0, np.nan)):  # NaN: truthy
        adata.var["highly_variable"] = flags
        with pytest.raises(DataError, match=r"var\['highly_variable'\] must be boolean.*dtype"):
            from_anndata(adata, use_highly_variable=True)
    del adata.var["highly_variable"]
    adata.var["highly_variable_genes"] = True
    with pytest.raises(DataError, match=r"no 'highly_variable' column \(columns like it: \['highly_variable_genes'\]"):
        from_anndata(adata, use_highly_variable=True)
    # a trained model's genes: taken by name, whatever this file's own flags (here another gene set)
    adata.var["highly_variable"] = np.arange(adata.n_vars) >= 3
    data = from_anndata(adata, use_highly_variable=True, feature_names=kept[::-1])
    assert data.feature_names == kept[::-1]
    np.testing.assert_array_equal(data.x.toarray() if sp.issparse(data.x) else data.x,
                                  counts_of(adata)[:, [adata.var_names.get_loc(g) for g in kept[::-1]]])
    with pytest.raises(DataError, match=r"genes of feature_names: 1 missing \[.gene1.\], 0 extra.*"
                                        r"adata\[:, feature_names\]"):
        from_anndata(adata[:, [g for g in adata.var_names if g != "gene1"]].copy(), use_highly_variable=True,
                     feature_names=kept)


def test_replogle_guide_pairs_with_non_targeting_merged_into_control():
    guides = ["CTSC_-_880.23-P1P2|CTSC_-_889.23-P1P2", "CWC25_+_369.23-P1P2|CWC25_+_361.23-P1P2",
              "non-targeting_03530|non-targeting_01407", "non-targeting_00442|non-targeting_01312"]
    adata = make_screen(labels=[g for g in guides for _ in range(20)])
    adata.obs = adata.obs.rename(columns={"perturbation": "sgID_AB"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # '+', '|' and '_' inside names join no labels of their own
        data = from_anndata(adata, perturbation_key="sgID_AB", control="non-targeting", control_match="contains",
                            delimiter=None, task="replogle")
    assert data.perturbation_names == sorted(guides[:2])  # '+' inside a guide name is not a pair
    np.testing.assert_array_equal(data.dosages.sum(1), [1.0] * 40 + [0.0] * 40)
    assert (data.split == "test").sum() == 80 - math.floor(0.8 * 80)


def test_contains_match_with_a_delimiter_drops_control_members_only():
    """``control_match="contains"`` with a delimiter tests each member: ``A+ctrl_1`` is the
    single A (not a control cell), ``ctrl_1+ctrl_2`` a control."""
    labels = ["ctrl_1"] * 20 + ["ctrl_1+ctrl_2"] * 10 + ["A"] * 10 + ["A+ctrl_2"] * 10 + ["B"] * 10 + ["A+B"] * 10
    data = from_anndata(make_screen(labels=labels), control="ctrl", control_match="contains")
    assert data.perturbation_names == ["A", "B"]
    np.testing.assert_array_equal(data.dosages, np.repeat([[0, 0], [0, 0], [1, 0], [1, 0], [0, 1], [1, 1]],
                                                          [20, 10, 10, 10, 10, 10], axis=0))
    # a control label containing the delimiter stays a control: its parts are no labels of their own
    labels = ["ctrl"] * 10 + ["ctrl_1"] * 10 + ["ctrl_2"] * 10 + ["A"] * 10 + ["B"] * 10 + ["A_B"] * 10
    data = from_anndata(make_screen(labels=labels), control="ctrl", control_match="contains", delimiter="_")
    assert data.perturbation_names == ["A", "B"] and (data.dosages.sum(1) == 0).sum() == 30
    labels = ["non_targeting_1"] * 20 + ["A"] * 10 + ["B"] * 10
    data = from_anndata(make_screen(labels=labels), control="non_targeting", control_match="contains",
                        delimiter="_")
    assert data.perturbation_names == ["A", "B"] and (data.dosages.sum(1) == 0).sum() == 20
    # numbered controls are controls, without a warning
    labels = ["ctrl"] * 10 + ["ctrl1"] * 10 + ["NegCtrl10_ctrl0"] * 10 + ["A"] * 10 + ["B"] * 10
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        data = from_anndata(make_screen(labels=labels), control="ctrl", control_match="contains", delimiter=None)
    assert data.perturbation_names == ["A", "B"]
    # a control inside a longer name ("T10" for "T1") is matched, but named in a warning
    labels = ["T1"] * 20 + ["T10"] * 10 + ["A"] * 10 + ["B"] * 10
    with pytest.warns(DataWarning, match=r"such as \['T10'\] \(1 in all\) contain the control 'T1' only inside a "
                                         r"longer name.*control_match='exact'"):
        data = from_anndata(make_screen(labels=labels), control="T1", control_match="contains")
    assert data.perturbation_names == ["A", "B"] and (data.dosages.sum(1) == 0).sum() == 30


def test_combination_labels_read_wrongly_warn():
    """Pairs of labels that occur alone, joined by another separator than the delimiter,
    and (additive encoding) perturbations that never occur alone are named."""
    adata = make_screen()  # every pair member also occurs alone: no such warning
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*(join labels|only inside combinations)", DataWarning)
        from_anndata(adata)
        from_anndata(adata, encode_combinations="unique")
    for delimiter in (None, "|"):
        with pytest.warns(DataWarning, match=r"such as \['A\+B', 'A\+C', 'A\+D'\] \(10 in all\) join labels of their "
                                             rf"own with '\+', but the delimiter is {re.escape(repr(delimiter))}.*"
                                             r"delimiter='\+'"):
            data = from_anndata(adata, delimiter=delimiter)
        assert "A+B" in data.perturbation_names  # registered as asked, but not silently
    labels = ["control"] * 30 + [c for c in SINGLES + ["HLA+A", "HLA+A", "B+C"] for _ in range(10)]
    with pytest.warns(DataWarning, match=r"1 perturbations occur only inside combinations, never alone: \['HLA'\] "
                                         r"\(in \['HLA\+A'\]\)"):
        data = from_anndata(make_screen(labels=labels))
    assert "HLA" in data.perturbation_names



def test_labels_that_look_misspelled_missing_or_like_controls_warn():
    """Names differing only in case, names that are missing values written as text, and
    names that look like controls are learned as perturbations, with a warning each."""
    cases = [("klf1", r"perturbation names that differ only in case or white space \(1 sets\), e.g. \['A / a'\]"),
             ("nan", r"perturbation names \['nan'\] look like missing values"),
             ("NegCtrl1", r"perturbation names \['NegCtrl1'\] look like control labels, but the control is "
                          r"'control'")]
    for extra, message in cases:
        label = "a" if extra == "klf1" else extra
        labels = ["control"] * 30 + [c for c in SINGLES + [label] for _ in range(10)]
        with pytest.warns(DataWarning, match=message):
            data = from_anndata(make_screen(labels=labels))
        assert label in data.perturbation_names
    for gene in ("NT5E", "NTRK1", "CONTROLLER1"):  # genes, not controls
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataWarning)
            from_anndata(make_screen(labels=["control"] * 30 + [c for c in SINGLES + [gene] for _ in range(10)]))


# -------------------------------------------------------------------------- validation


def test_missing_perturbation_key_lists_obs_columns():
    with pytest.raises(DataError, match=r"no column 'condition'.*obs columns: \['perturbation'\].*perturbation_key"):
        from_anndata(make_screen(), perturbation_key="condition")


def test_absent_control_label_lists_the_labels_seen():
    with pytest.raises(DataError, match=r"control label 'ctrl'.*absent.*labels seen.*'control'.*control=<label>"):
        from_anndata(make_screen(), control="ctrl")
    with pytest.raises(DataError, match=r"control label 'Control'.*absent from obs\['perturbation'\]; did you mean "
                                        r"\['control'\]\? labels seen"):
        from_anndata(make_screen(), control="Control")  # letter case
    with pytest.raises(DataError, match=r"did you mean \['control'\]\?"):
        from_anndata(make_screen(), control="contrl")


def test_no_control_cells_in_training_is_an_error():
    adata = make_screen()
    adata.obs["split"] = np.where(adata.obs["perturbation"] == "control", "test", "train")
    with pytest.raises(DataError, match=r"no control cells \('control'\) in the training split.*'test': 30"):
        from_anndata(adata, split_key="split")
    norman = make_norman_like(make_screen(labels=["A", "A+B"] * 10))
    with pytest.raises(DataError, match="no control cells"):
        from_anndata(norman, perturbation_key="guide_identity", guide_column_pattern="guide_")
    norman = make_norman_like(make_screen())
    norman.obs["guide_NegCtrl0"] = (norman.obs["guide_identity"].str.startswith("NegCtrl")).astype(int)
    with pytest.raises(DataError, match=r"no control cells.*The columns \['guide_NegCtrl0'\] look like control "
                                        r"guides, whose cells count as perturbed"):
        from_anndata(norman, perturbation_key="guide_identity", guide_column_pattern="guide_")
    norman.obs.loc[norman.obs_names[:5], "guide_NegCtrl0"] = 0  # some controls left: a warning
    with pytest.warns(DataWarning, match=r"\['guide_NegCtrl0'\] look like control guides"):
        data = from_anndata(norman, perturbation_key="guide_identity", guide_column_pattern="guide_")
    # a vocabulary holding a control-like name is no error here: the guide columns, not the label, decide
    norman.obs = norman.obs.rename(columns={"guide_NegCtrl0": "guide_control"})
    with pytest.warns(DataWarning):
        data = from_anndata(norman, perturbation_key="guide_identity", guide_column_pattern="guide_")
    assert "control" in data.perturbation_names
    with pytest.warns(DataWarning, match="look like control guides"):
        from_anndata(norman, perturbation_key="guide_identity", guide_column_pattern="guide_",
                     perturbations=data.perturbation_names, for_training=False)


@pytest.mark.parametrize("value, kind", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                         (-1.0, "negative"), (0.5, "non-integer")])
def test_bad_count_values_name_the_cells(value, kind):
    adata = make_screen(sparse=False)
    adata.layers["counts"][5, 3] = value
    with pytest.raises(DataError, match=rf"layers\['counts'\] has 1 {kind} values .* in 1 cells, e.g. \['cell5'\]") as error:
        from_anndata(adata, likelihood="library_nb")
    assert "rounding noise" not in str(error.value)


def test_counts_with_rounding_noise_get_a_rounding_hint():
    adata = make_screen(sparse=False)
    counts = adata.layers["counts"]
    adata.layers["counts"] = counts * np.float32(1.0000001) + np.float32(1e-5) * (counts > 0)  # zeros stay 0
    with pytest.raises(DataError, match=r"non-integer values .* within 0.001 of a non-zero whole number.*np.rint"):
        from_anndata(adata, likelihood="library_nb")
    for other in (counts_of(make_screen()) / 1e4, counts_of(make_screen()) + 0.5 * (np.arange(12) == 3)):
        adata.layers["counts"] = (other * np.float32(1.0000001)).astype(np.float32)  # normalised; one real 0.5
        with pytest.raises(DataError, match="non-integer") as error:
            from_anndata(adata, likelihood="library_nb")
        assert "0.001" not in str(error.value)  # judged on every value, not on one example


def test_real_values_are_fine_with_the_normal_likelihood():
    adata = make_screen()
    data = from_anndata(adata, counts_layer=None, likelihood="normal")  # X = log1p(counts)
    np.testing.assert_allclose(data.x, np.log1p(counts_of(adata)), rtol=1e-6)
    with pytest.raises(DataError, match="non-integer"):
        from_anndata(adata, counts_layer=None, likelihood="poisson")


def test_empty_or_duplicated_gene_set():
    adata = make_screen()
    with pytest.raises(DataError, match="empty gene set"):
        from_anndata(adata[:, []].copy())
    duplicated = adata.copy()
    duplicated.var_names = ["gene0"] * 2 + list(adata.var_names[2:])
    with pytest.raises(DataError, match=r"1 gene names occur more than once.*\['gene0'\].*var_names_make_unique"):
        from_anndata(duplicated)


def test_duplicated_obs_names():
    adata = make_screen()
    adata.obs_names = ["cell0"] * 3 + list(adata.obs_names[3:])
    with pytest.raises(DataError, match=r"cell names occur more than once.*\['cell0'\].*obs_names_make_unique"):
        from_anndata(adata)


@pytest.mark.parametrize("label, message", [
    ("A+", "has an empty member"),
    ("+B", "has an empty member"),
    ("A+A", r"names \['A'\] more than once"),
])
def test_malformed_pair_labels(label, message):
    adata = make_screen()
    adata.obs.loc["cell40", "perturbation"] = label
    with pytest.raises(DataError, match=message):
        from_anndata(adata)


def test_pair_members_outside_a_fixed_vocabulary():
    with pytest.raises(DataError, match=r"2 perturbations are not in the vocabulary of 4: \['E', 'F'\]"
                                        r".*conditions \['E', 'F', 'A\+E'"):
        from_anndata(make_screen(), perturbations=list("ABCD"))
    with pytest.warns(DataWarning, match=r"\['Z'\]"):  # a larger vocabulary reorders and pads
        data = from_anndata(make_screen(), perturbations=list("FEDCBAZ"))
    assert data.perturbation_names == list("FEDCBAZ") and not data.dosages[:, -1].any()


def test_perturbation_without_training_cells_warns():
    adata = make_screen()
    adata.obs["split"] = np.where(adata.obs["perturbation"].str.contains("F"), "test", "train")  # F, A+F, B+F
    with pytest.warns(DataWarning, match=r"1 perturbations have no training cells: \['F'\].*model ATEs are the prior.s"):
        data = from_anndata(adata, split_key="split")
    assert data.cells_per_perturbation("train")[SINGLES.index("F")] == 0


def test_counts_normalised_to_a_fixed_total_warn():
    """Rounded CP10k values pass the integer check but warn (totals all near 10,000);
    raw counts, and a library_size_key, do not."""
    adata = make_screen()
    counts = adata.layers["counts"].toarray()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        from_anndata(adata)  # raw counts: totals vary
    adata.layers["counts"] = sp.csr_matrix(np.round(counts / counts.sum(1, keepdims=True) * 1e4))
    with pytest.warns(DataWarning, match=r"every cell's total count in layers\['counts'\] \(over the modelled genes\) "
                                         r"lies between 99\d\d and 100\d\d \(within 5% of 1000\d\): these look "
                                         r"normalised.*downsampled to a fixed depth"):
        from_anndata(adata)
    adata.obs["total"] = 1.2e4
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        from_anndata(adata, library_size_key="total")


def test_perturbation_with_few_training_cells_warns():
    """1-4 training cells: a warning naming each such perturbation with its count; 5 or
    more (every other perturbation of the screen) are not named."""
    labels = ["control"] * 30 + [c for c in SINGLES + PAIRS for _ in range(10)] + ["G"] * 2 + ["A+G"] * 2
    with pytest.warns(DataWarning, match=r"1 perturbations have fewer than 5 training cells: \['G \(4\)'\]; "
                                         "their learned effects rest on very few cells"):
        adata = make_screen(labels)
        adata.obs["split"] = ["val"] * 5 + ["test"] * 5 + ["train"] * (len(labels) - 10)  # held out: controls
        from_anndata(adata, split_key="split")


@pytest.mark.parametrize("control", [0, np.int64(0), "0"])
def test_integer_control_label_matches_its_string(control):
    adata = make_screen()
    codes = {"control": 0, **{name: i + 1 for i, name in enumerate(SINGLES + PAIRS)}}
    adata.obs["pert_int"] = adata.obs["perturbation"].map(codes).astype(int)  # ints, not strings
    data = PerturbationData.from_anndata(adata, perturbation_key="pert_int", control=control, delimiter=None,
                                         perturbations=range(1, len(codes)))  # an int vocabulary too
    assert data.control == "0" and data.registration["control"] == "0"
    assert data.perturbation_names == [str(i) for i in range(1, len(codes))]
    is_control = (adata.obs["perturbation"] == "control").to_numpy()
    assert not data.dosages[is_control].any() and np.all(data.dosages[~is_control].sum(1) == 1)
    json.dumps(data.registration)  # saved with checkpoints: a numpy integer would not serialise


def test_csr_counts_with_duplicate_entries_are_read_as_their_sums():
    """A CSR matrix may store one entry in parts (0.5 + 0.5): scipy reads the sum, and so
    does the registration (no non-integer error); the caller's matrix is left as it was."""
    adata = make_screen()
    counts = counts_of(adata)
    rows, columns = np.nonzero(counts)
    halves = np.repeat(counts[rows, columns] / 2, 2).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(2 * np.bincount(rows, minlength=counts.shape[0]))])
    split = sp.csr_matrix((halves, np.repeat(columns, 2), indptr), shape=counts.shape)
    assert not split.has_canonical_format and np.array_equal(split.toarray(), counts)
    adata.layers["counts"] = split
    data = from_anndata(adata, likelihood="library_nb")
    np.testing.assert_array_equal(data.x.toarray(), counts)
    assert not adata.layers["counts"].has_canonical_format


@pytest.mark.parametrize("storage", ["dense", "sparse", "backed"])
def test_all_zero_genes_and_empty_cells_warn(storage, tmp_path):
    adata = make_screen(sparse=False)
    counts = adata.layers["counts"]
    counts[:, [3, 7]] = 0.0
    counts[[5, 40]] = 0.0
    if storage != "dense":
        counts[:, 7] = 1.0
        counts = sp.csr_matrix(counts)
        counts.data[counts.indices == 7] = 0.0  # stored zeros are zeros
        adata.layers["counts"] = counts
    source = adata
    if storage == "backed":
        source = tmp_path / "screen.h5ad"
        write_h5ad(adata, source)
    with pytest.warns(DataWarning) as record:
        data = from_anndata(source, backed=storage == "backed", likelihood="library_nb")
    messages = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    assert len(messages) == 2, messages
    assert re.search(r"2 of 12 genes are zero in every cell of layers\['counts'\]: \['gene3', 'gene7'\]; "
                     r"they carry no signal.*noise.*filter_genes\(adata, min_cells=1\)", messages[0]), messages[0]
    assert re.search(rf"2 of {adata.n_obs} cells have no non-zero value in layers\['counts'\].*\['cell5', 'cell40'\].*"
                     r"library size \(total count\) is 0.*filter_cells\(adata, min_genes=1\)", messages[1]), messages[1]
    np.testing.assert_array_equal(data.library_size, counts_of(adata).sum(1))  # the same pass gives the sums
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        from_anndata(make_screen(), likelihood="library_nb")  # nothing empty: no warning


def test_scoring_registration_skips_the_training_split_checks():
    adata = make_screen(sparse=False)
    vocabulary, genes = SINGLES, list(adata.var_names)
    scored = adata[25:45].copy()  # 5 controls, A and B only: C..F have no training cells
    scored.layers["counts"][:, 3] = 0.0
    with pytest.warns(DataWarning) as record:
        from_anndata(scored, perturbations=vocabulary, feature_names=genes)
    messages = " | ".join(str(w.message) for w in record)
    assert "genes are zero in every cell" in messages
    assert "4 perturbations have no training cells: ['C', 'D', 'E', 'F']" in messages
    with pytest.raises(DataError, match="control label 'control'.*absent"):
        from_anndata(adata[-20:].copy(), perturbations=vocabulary, feature_names=genes)  # pairs only
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # nor the all-zero gene: the model fixes the genes
        data = from_anndata(scored, perturbations=vocabulary, feature_names=genes, for_training=False)
        from_anndata(adata[-20:].copy(), perturbations=vocabulary, feature_names=genes, for_training=False)
    assert data.x.shape[0] == 20
    scored.layers["counts"][0] = 0.0  # an empty cell is still named
    with pytest.warns(DataWarning, match=r"1 of 20 cells have no non-zero value.*\['cell25'\]"):
        from_anndata(scored, perturbations=vocabulary, feature_names=genes, for_training=False)


def test_unreadable_paths(tmp_path):
    with pytest.raises(DataError, match="no file at .*missing.h5ad"):
        from_anndata(tmp_path / "missing.h5ad")
    (tmp_path / "table.h5ad").write_text("gene,count\nA,1\n")
    with pytest.raises(DataError, match=r"table.h5ad' is not a readable .h5ad file"):
        from_anndata(tmp_path / "table.h5ad")


def test_missing_layer_and_bad_split_values():
    with pytest.raises(DataError, match=r"no layer 'raw'; layers: \['counts'\].*counts_layer=None"):
        from_anndata(make_screen(), counts_layer="raw")
    adata = make_screen()
    adata.raw = adata.copy()
    del adata.layers["counts"]
    with pytest.raises(DataError, match=r"no layer 'counts'; layers: \[\] \(adata.raw holds a matrix.*"
                                        r"adata.layers\['counts'\] = adata.raw\[:, adata.var_names\].X\)"):
        from_anndata(adata)
    adata = make_screen()
    adata.obs["split"] = "training"
    with pytest.raises(DataError, match=r"obs\['split'\] has values \['training'\]"):
        from_anndata(adata, split_key="split")


def test_check_compatible_names_missing_extra_genes_and_unknown_perturbations():
    data = from_anndata(make_screen())
    metadata = data.metadata("log_standardize")
    check_compatible(metadata, make_screen()[:, ::-1].copy())  # same genes in another order: fine
    other = make_screen(n_genes=14)[:, 2:].copy()  # gene0, gene1 missing; gene12, gene13 extra
    with pytest.raises(DataError, match=r"2 missing \['gene0', 'gene1'\], 2 extra \['gene12', 'gene13'\]"):
        check_compatible(metadata, other)
    recased = make_screen()
    recased.var_names = [name.upper() if name in ("gene3", "gene7") else name for name in recased.var_names]
    with pytest.raises(DataError, match=r"2 missing \['gene3', 'gene7'\], 2 extra \['GENE3', 'GENE7'\]; 2 of the "
                                        r"missing genes are in the data in other letter case \(e\.g\. 'GENE3' for "
                                        r"'gene3'\): rename them"):
        check_compatible(metadata, recased)
    new = make_screen(labels=["A+G"] * 5 + ["control"] * 5)
    with pytest.raises(DataError, match=r"not in the vocabulary of 6: \['G'\]"):
        check_compatible(metadata, new)
    new = make_screen(labels=["A"] * 5 + ["control"] * 5 + ["NT"] * 5)  # its controls written otherwise
    with pytest.raises(DataError, match=r"\['NT'\].*if \['NT'\] are this file's control cells, register it with its "
                                        r"control label \(predictor.register\(adata, control='NT'\)\)"):
        check_compatible(metadata, new)


# ------------------------------------------------------------------------------ splits


def test_shuffle_split_matches_scikit_learn():
    # sklearn.model_selection.train_test_split(range(10), test_size=0.2, random_state=0 / 42)
    train, test = splits_lib.shuffle_split(10, 0, test_size=0.2)
    assert test.tolist() == [2, 8] and train.tolist() == [4, 9, 1, 6, 7, 3, 0, 5]
    train, test = splits_lib.shuffle_split(10, 42, test_size=0.2)
    assert test.tolist() == [8, 1] and train.tolist() == [5, 0, 7, 2, 9, 4, 3, 6]
    train, test = splits_lib.shuffle_split(7, 0, train_size=0.8)  # floor(5.6) = 5 train
    assert len(train) == 5 and len(test) == 2


def _pairs_in(data, split):
    cells = (data.split == split) & (data.dosages.sum(1) == 2)
    names = np.asarray(data.perturbation_names)
    return {"+".join(names[row != 0]) for row in data.dosages[cells]}


@pytest.fixture(scope="module")
def norman_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("norman") / "norman_like.h5ad"
    write_h5ad(make_norman_like(make_screen()), path)
    return path


def test_norman_ood_split_arithmetic(norman_path):
    adata = anndata.read_h5ad(norman_path)
    conditions = adata.obs["guide_identity"].to_numpy()
    n_members = adata.obs[[f"guide_{g}" for g in SINGLES]].sum(axis=1).to_numpy()
    n_pairs = len(PAIRS)
    previous_train, previous_cells = set(), set()
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        train_pairs, test_pairs = splits_lib.split_combinations(conditions, n_members, f, 0.25, seed=0)
        assert len(test_pairs) == math.ceil(0.25 * n_pairs) == 3
        assert len(train_pairs) == math.floor(f * n_pairs)
        if f <= 0.75:
            assert not set(train_pairs) & set(test_pairs)
        assert previous_train <= set(train_pairs)  # nested as f grows
        assert splits_lib.split_combinations(conditions, n_members, f, 0.25, seed=0) == (train_pairs, test_pairs)
        previous_train = set(train_pairs)
        labels = splits_lib.norman_ood_split(conditions, n_members, f, 0.25, seed=0)
        pair_cells = n_members == 2
        assert set(conditions[pair_cells & np.isin(labels, ["train", "val"])]) <= set(train_pairs)
        tested = set(conditions[pair_cells & (labels == "test")])
        assert tested and tested <= set(test_pairs)
        assert np.all(labels[~pair_cells] != "test") and np.all(labels[~pair_cells] != splits_lib.NO_SPLIT)
        assert (labels[~pair_cells] == "val").sum() == math.ceil(0.2 * (~pair_cells).sum())
        cells = set(np.flatnonzero(pair_cells & (labels == "train")))
        assert previous_cells <= cells  # training cells accumulate too
        previous_cells = cells
    other_seed = splits_lib.split_combinations(conditions, n_members, 0.5, 0.25, seed=1)
    assert other_seed != splits_lib.split_combinations(conditions, n_members, 0.5, 0.25, seed=0)


def test_norman_ood_task_from_a_file(norman_path):
    data = from_anndata(norman_path, perturbation_key="guide_identity", guide_column_pattern="guide_",
                        task="norman_ood", frac_combinations_train=0.5, split_seed=3)
    train, test = _pairs_in(data, "train") | _pairs_in(data, "val"), _pairs_in(data, "test")
    assert len(test) == 3 and len(train) <= 5 and not train & test
    adata = anndata.read_h5ad(norman_path)
    # pair cells outside their pair's split stay, in no split (split ""), for the data ATEs alone
    assert data.x.shape[0] == adata.n_obs and (data.split == "").any()
    assert set(data.split[data.split != ""]) <= {"train", "val", "test"}
    again = from_anndata(norman_path, perturbation_key="guide_identity", guide_column_pattern="guide_",
                         task="norman_ood", frac_combinations_train=0.5, split_seed=3)
    np.testing.assert_array_equal(again.split, data.split)
    with warnings.catch_warnings():  # the paper's fractions keep test pairs all unseen (<= 0.75) or all seen (1)
        warnings.filterwarnings("error", message=".*test pairs training pairs too")
        for fraction in (0.75, 1.0):
            from_anndata(norman_path, perturbation_key="guide_identity", guide_column_pattern="guide_",
                         task="norman_ood", frac_combinations_train=fraction)
    with pytest.warns(DataWarning, match=r"frac_combinations_train=0\.9 makes [12] of the 3 test pairs training "
                                         r"pairs too.*up to frac_combinations_train=0\.75"):
        from_anndata(norman_path, perturbation_key="guide_identity", guide_column_pattern="guide_",
                     task="norman_ood", frac_combinations_train=0.9)


def test_norman_data_efficiency_subsamples_training_pair_cells(norman_path):
    adata = anndata.read_h5ad(norman_path)
    n_members = adata.obs[[f"guide_{g}" for g in SINGLES]].sum(axis=1).to_numpy()
    n_pair_cells = int((n_members == 2).sum())
    n_pair_train = n_pair_cells - math.ceil(0.2 * n_pair_cells)
    n_pair_train -= math.ceil(0.2 * n_pair_train)
    previous = None
    for frac in (0.25, 0.5, 1.0):
        labels = splits_lib.norman_data_efficiency_split(n_members, frac, seed=0)
        assert ((labels == "train") & (n_members == 2)).sum() == math.floor(frac * n_pair_train)
        if previous is not None:
            assert set(np.flatnonzero(previous == "train")) <= set(np.flatnonzero(labels == "train"))
            np.testing.assert_array_equal(previous == "test", labels == "test")  # same val / test cells
            np.testing.assert_array_equal(previous == "val", labels == "val")
        previous = labels
    data = from_anndata(norman_path, perturbation_key="guide_identity", guide_column_pattern="guide_",
                        task="norman_data_efficiency", frac_combination_cells_train=0.5)
    assert len(_pairs_in(data, "test")) > 3  # every pair can be in test


# ------------------------------------------------------------------- Replogle filter


def _raw_replogle(path, spec):
    """A small raw file in the layout of K562_gwps_raw_singlecell_01.h5ad."""
    rng = np.random.default_rng(1)
    targets = spec["perturbed_genes"][:4] + ["WEAKGENE", "non-targeting"]
    gene = np.array(targets)[rng.integers(0, len(targets), 60)]
    obs = pd.DataFrame({"gene": gene, "sgID_AB": [f"{g}_x|{g}_y" for g in gene]},
                       index=[f"BC{i}-1" for i in range(60)])
    names = spec["measured_genes"][:6] + [spec["measured_genes"][0], "NOTMEASURED1", "NOTMEASURED2"]
    var = pd.DataFrame({"gene_name": names}, index=[f"ENSG{i:05d}" for i in range(len(names))])
    x = rng.poisson(2.0, (60, len(names))).astype(np.float32)
    write_h5ad(anndata.AnnData(X=x, obs=obs, var=var), path)
    return obs, x


def test_packaged_filter_lists():
    spec = load_filter()
    assert len(set(spec["perturbed_genes"])) == 681 and len(set(spec["measured_genes"])) == 1186
    assert spec["n_control_cells"] == 2000 and len(spec["pathways"]) == 8


def test_prepare_replogle_cli_reproduces_the_filter(tmp_path):
    spec = dict(load_filter(), n_control_cells=5)
    (tmp_path / "filter.json").write_text(json.dumps(spec))
    obs, x = _raw_replogle(tmp_path / "raw.h5ad", spec)
    out = tmp_path / "filtered.h5ad"
    result = subprocess.run([sys.executable, "-m", "sams_jax.data.prepare_replogle", str(tmp_path / "raw.h5ad"),
                             str(out), "--filter", str(tmp_path / "filter.json"), "--chunk-size", "7"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # the authors' rule: numpy.random.seed(0); shuffle the non-targeting positions; keep the first 5
    keep = np.isin(obs["gene"], spec["perturbed_genes"])
    controls = np.flatnonzero(obs["gene"] == "non-targeting")
    np.random.seed(0)
    np.random.shuffle(controls)
    keep[controls[:5]] = True
    filtered = anndata.read_h5ad(out)
    assert filtered.obs_names.tolist() == obs.index[keep].tolist()
    assert filtered.var["gene_name"].tolist() == spec["measured_genes"][:6] + [spec["measured_genes"][0]]
    np.testing.assert_array_equal(filtered.X.toarray(), x[keep][:, :7])
    assert filtered.uns["pathways"]["EXOSOME"][:3].tolist() == ["ZC3H3", "ZFC3H1", "CAMTA2"]
    assert f"{keep.sum()} cells x 7 genes" in result.stdout
    assert "warning: the result is not the paper's 118,641 x 1,187" in result.stderr  # a small file, as here
    data = from_anndata(out, perturbation_key="sgID_AB", control="non-targeting", control_match="contains",
                        delimiter=None, counts_layer=None, task="replogle", gene_symbols_key="gene_name")
    assert len(data.perturbation_names) == len(set(obs["gene"][keep]) - {"non-targeting"})
    assert data.feature_symbols == filtered.var["gene_name"].tolist()  # as configs/replogle.py reads them
    assert (data.dosages.sum(1) == 0).sum() == 5


def test_prepare_replogle_missing_raw_file_is_a_clean_error(tmp_path):
    out = tmp_path / "out.h5ad"
    with pytest.raises(DataError, match="no file at .*plus.figshare.com/ndownloader/files/35775507"):
        prepare_replogle(str(tmp_path / "raw.h5ad"), str(out))
    spec = load_filter()
    obs, _ = _raw_replogle(tmp_path / "raw.h5ad", spec)
    with pytest.raises(DataError, match="chunk_size=0"):
        prepare_replogle(str(tmp_path / "raw.h5ad"), str(out), spec, chunk_size=0)
    raw = anndata.read_h5ad(tmp_path / "raw.h5ad")
    del raw.obs["sgID_AB"]
    write_h5ad(raw, tmp_path / "no_guides.h5ad")
    with pytest.raises(DataError, match="no obs column 'sgID_AB' \\(the guide pair of each cell"):
        prepare_replogle(str(tmp_path / "no_guides.h5ad"), str(out), spec)
    assert not out.exists()


# ----------------------------------------------------------------- configs, end to end


def _config(name):
    sys.path.insert(0, str(ROOT))
    try:
        module = __import__(f"configs.{name}", fromlist=["get_config"])
    finally:
        sys.path.pop(0)
    return module.get_config()


@pytest.mark.parametrize("name, where", [("anndata", "your .h5ad"), ("norman_ood", "figshare.com/files/34027562"),
                                         ("norman_data_efficiency", "34027562"), ("replogle", "prepare_replogle")])
def test_paper_configs_validate_and_ask_for_a_path(name, where):
    config = _config(name)
    validate_config(config)
    with pytest.raises(DataError, match=rf"set --config.data.path=/path/to/file.h5ad; .*{where}"):
        load_data(config.data)


def test_paper_config_values():
    norman, replogle = _config("norman_ood"), _config("replogle")
    assert (norman.model.n_latent, norman.model.embedding_encoder_n_layers, norman.model.embedding_encoder_n_hidden,
            norman.train.max_steps, norman.train.grad_clip_norm, norman.data.frac_combinations_test) == \
        (200, 4, 400, 30_000, 100.0, 0.25)
    assert (replogle.model.n_latent, replogle.model.embedding_encoder_n_hidden, replogle.train.max_steps,
            replogle.data.control_match, replogle.data.delimiter) == (100, 200, 150_000, "contains", "")
    # the rest of SPEC 7's table, inherited from base_config (a change there would change the published runs)
    for config, embedding_layers in ((norman, 4), (replogle, 2)):
        model, train = config.model, config.train
        assert (model.likelihood, model.decoder_n_layers, model.decoder_n_hidden, model.basal_encoder_n_layers,
                model.basal_encoder_n_hidden, model.embedding_encoder_n_layers, model.mask_prior_prob) == \
            ("library_nb", 1, 400, 1, 400, embedding_layers, 0.01)
        assert (train.learning_rate, train.batch_size, config.objective.n_particles,
                config.eval.iwelbo_n_particles) == (3e-4, 512, 5, 100)
    from sams_jax.evaluate import evaluate
    defaults = inspect.signature(evaluate).parameters
    assert (defaults["iwelbo_particles"].default, defaults["ate_particles"].default) == (100, 2_500)
    norman.data.split_key = "split"
    with pytest.raises(ConfigError, match="both define the splits"):
        validate_config(norman)


def test_every_config_validates_and_the_scale_configs_follow_the_paper_ones():
    """configs/*_scale.py (simulated screens at the paper's sizes) train with the paper's
    model and schedule for that data set (only the steps per dispatch differ)."""
    for path in sorted((ROOT / "configs").glob("*.py")):
        validate_config(_config(path.stem))
    for scale, paper in (("replogle_scale", "replogle"), ("norman_scale", "norman_ood")):
        simulated, real = _config(scale), _config(paper)
        assert simulated.data.source == "simulation" and simulated.data.observation == "library_nb"
        assert simulated.model.to_dict() == real.model.to_dict(), scale
        assert {**simulated.train.to_dict(), "steps_per_dispatch": None} == \
            {**real.train.to_dict(), "steps_per_dispatch": None}, scale
    replogle = _config("replogle_scale").data
    assert (replogle.n_perturbations, replogle.n_genes, sum(replogle.cells_per_perturbation)) == (681, 1_187, 174)


def test_train_end_to_end_on_an_h5ad_file(tmp_path, monkeypatch):
    from sams_jax.checkpoint import Checkpointer
    from sams_jax.train import train_and_evaluate

    path = tmp_path / "screen.h5ad"
    adata = make_screen()
    adata.obs["split"] = np.array(["train", "train", "val", "test"])[np.arange(adata.n_obs) % 4]
    adata.var["symbol"] = [f"SYM{i}" for i in range(adata.n_vars)]
    write_h5ad(adata, path)
    config = _config("anndata")
    monkeypatch.chdir(tmp_path)
    config.data.update(path="screen.h5ad", split_key="split",  # equal val / test sizes: one IWELBO compile
                       gene_symbols_key="symbol")
    config.model.update(n_latent=3, decoder_n_hidden=8, basal_encoder_n_hidden=8, embedding_encoder_n_hidden=8)
    config.objective.n_particles = 2
    config.train.update(batch_size=32, max_steps=20, eval_every=10, steps_per_dispatch=10, eval_batch_size=64,
                        progress=False)
    config.eval.iwelbo_n_particles = 4
    metrics = train_and_evaluate(config, str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path / "run")  # evaluated from elsewhere: the checkpoint holds the file's absolute path
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(saved["test/IWELBO"]) and saved["test/IWELBO"] < 0 and saved == metrics
    checkpoints = Checkpointer(str(tmp_path / "run"), read_only=True)
    try:
        saved_config, metadata = checkpoints.restore_json(checkpoints.best_step())
    finally:
        checkpoints.close()
    assert saved_config["data"]["path"] == str(path) and config.data.path == "screen.h5ad"  # the caller's: as given
    assert metadata["perturbation_names"] == SINGLES
    assert metadata["registration"]["control"] == "control"
    check_compatible(metadata, path)  # the training file fits its own checkpoint
    _predict_from_another_layout(tmp_path / "run", adata)
    _evaluate_after_the_file_moved(tmp_path / "run", path, tmp_path / "moved.h5ad", metrics)
    _evaluate_given_data(tmp_path / "run", tmp_path / "moved.h5ad", monkeypatch)


def _evaluate_given_data(workdir, path, monkeypatch):
    """evaluate(data=...) takes an AnnData (registered as at training) and checks a
    PerturbationData against the checkpoint; a run trained on data passed from Python is
    evaluated from the file they were registered from (--data-path)."""
    import sams_jax
    from sams_jax import evaluate as evaluate_lib

    options = dict(iwelbo_particles=4, ate_particles=8, plots=False, sparse_basis_restarts=0, write=False)
    expected = evaluate_lib.evaluate(str(workdir), data_path=str(path), **options)
    assert evaluate_lib.evaluate(str(workdir), data=anndata.read_h5ad(path), **options) == expected
    predictor = sams_jax.load(str(workdir))
    data = predictor.register_training_data(path)
    data.split = np.roll(data.split, 1)  # the right cells, split otherwise
    with pytest.raises(DataError, match=r"the data passed to evaluate \(data=\) are not the data the run was trained "
                                        r"on: .*cells_per_perturbation"):
        evaluate_lib.evaluate(str(workdir), data=data, **options)
    predictor.metadata["data_source"] = "python"  # as if trained with train_and_evaluate(config, workdir, data=...)
    predictor.config.data.source = "simulation"  # whose config.data then describes other data
    monkeypatch.setattr(evaluate_lib, "load", lambda *args: predictor)
    assert evaluate_lib.evaluate(str(workdir), data_path=str(path), **options) == expected
    with pytest.raises(evaluate_lib.EvaluationError, match=r"trained on data passed from Python.*or the .h5ad file "
                                                           r"they were registered from: --data-path FILE"):
        evaluate_lib.evaluate(str(workdir), **options)
    # measured against a perturbation, the data's control cells are an intervention like the others; the
    # control itself asked for is left out, with a warning
    options.update(write=True)
    evaluate_lib.evaluate(str(workdir), data_path=str(path), control="A", **options)
    ate = anndata.read_h5ad(workdir / "eval" / "ate.h5ad")
    assert ate.uns["control"] == "A" and "A" not in ate.obs_names and ate.obs.loc["control", "observed"]
    with pytest.warns(evaluate_lib.EvaluationWarning, match=r"--interventions \['control'\] is the control "
                                                             r"'control', whose ATE is 0 by definition; left out"):
        evaluate_lib.evaluate(str(workdir), data_path=str(path), interventions=["control", "A+B"], **options)
    assert "control" not in anndata.read_h5ad(workdir / "eval" / "ate.h5ad").obs_names


def _evaluate_after_the_file_moved(workdir, path, moved, metrics):
    """evaluate --data-path scores a run whose file has moved; a missing file and a file
    with other genes are errors that say how to fix them."""
    from sams_jax.evaluate import EvaluationError, evaluate
    from sams_jax.predictor import InterventionError

    options = dict(iwelbo_particles=4, ate_particles=8, plots=False, sparse_basis_restarts=0)
    os.rename(path, moved)
    with pytest.raises(DataError, match=r"data file .*screen.h5ad' does not exist \(moved or deleted\?\); pass its "
                                        r"new path with --data-path"):
        evaluate(str(workdir), **options)
    results = evaluate(str(workdir), data_path=str(moved), **options)
    assert np.isfinite(results["IWELBO-test"]) and "ATE_pearsonr-all" in results
    # the run's gene symbols (data.gene_symbols_key) name the genes of the outputs
    ate = anndata.read_h5ad(workdir / "eval" / "ate.h5ad")
    assert ate.var["gene_symbol"].tolist() == [f"SYM{i}" for i in range(ate.n_vars)]
    top = pd.read_csv(workdir / "eval" / "top_genes.csv")
    assert (top["gene_symbol"] == "SYM" + top["gene"].str.removeprefix("gene")).all()
    without = anndata.read_h5ad(moved)  # symbols are display only: a file without the column still evaluates
    del without.var["symbol"]
    write_h5ad(without, path)
    assert evaluate(str(workdir), data_path=str(path), **{**options, "write": False}) == \
        {key: value for key, value in results.items()}
    reversed_genes = anndata.read_h5ad(moved)[:, ::-1].copy()
    write_h5ad(reversed_genes, path)
    with pytest.raises(DataError, match=r"feature_names \(the same 12 names in another order\); "
                                        r"normalization_stats.*--data-path NEW"):
        evaluate(str(workdir), data_path=str(path), **options)
    with pytest.raises(EvaluationError, match="not both"):
        evaluate(str(workdir), data=object(), data_path=str(moved), **options)
    relabelled = anndata.read_h5ad(moved)  # another screen's layout: its control is called "NTC"
    relabelled.obs["perturbation"] = relabelled.obs["perturbation"].astype(str).replace("control", "NTC")
    write_h5ad(relabelled, path)
    with pytest.raises(DataError, match=r"does not register as the run's data did \(the run's saved config.data: "
                                        r".*control='control'.*\): the control label 'control'.*register\(adata"):
        evaluate(str(workdir), data_path=str(path), **options)
    with pytest.raises(InterventionError, match=r"control='ctrl' is neither the data's control label \('control'\)"):
        evaluate(str(workdir), data_path=str(moved), control="ctrl", **options)


def _predict_from_another_layout(workdir, adata):
    """A trained model scores an AnnData that stores the screen differently (another obs
    column, the counts in X) through register's layout overrides; the errors say how."""
    import logging

    import sams_jax
    from sams_jax.predictor import InterventionError

    class Notes(logging.Handler):
        records: list = []

        def emit(self, record):
            self.records.append(record.getMessage())

    notes = Notes(logging.WARNING)
    logging.getLogger("absl").addHandler(notes)
    try:
        predictor = sams_jax.load(str(workdir))
    finally:
        logging.getLogger("absl").removeHandler(notes)
    assert notes.records == []  # Orbax's read-only notes are not shown on every load
    expected = predictor.iwelbo(adata, n_particles=4)
    moved = anndata.AnnData(X=adata.layers["counts"].copy(), obs=adata.obs.rename(columns={"perturbation": "gene"}),
                            var=adata.var)
    with pytest.raises(DataError, match=r"obs has no column 'perturbation'.*read with the registration "
                                        r"perturbation_key='perturbation'.*predictor.register\(adata, ...\)") as caught:
        predictor.iwelbo(moved, n_particles=4)
    assert "--config" not in str(caught.value)  # training flags do not apply to a trained model's data
    registered = predictor.register(moved, perturbation_key="gene", counts_layer=None)
    np.testing.assert_allclose(predictor.iwelbo(registered, n_particles=4), expected, rtol=1e-6)
    with pytest.raises(TypeError, match=r"register\(\) got \['task'\]"):
        predictor.register(moved, task="replogle")
    with pytest.raises(InterventionError, match="unknown perturbation 'NTC'.*the control is 'control'"):
        predictor.ate(["A"], control="NTC", n_particles=4)


def test_cli_empty_path_is_a_clean_error(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "sams_jax.train", "--config", "configs/norman_ood.py",
                             "--workdir", str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert "set --config.data.path=" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


def test_data_without_perturbations_is_a_clear_error_before_training(tmp_path):
    """Every label the control (a wrong column, an over-eager control_match): training
    used to run and then crash saving zero-size parameters."""
    adata = make_screen()
    adata.obs["perturbation"] = "control"
    data = from_anndata(adata, perturbation_key="perturbation", control="control", counts_layer="counts")
    with pytest.raises(DataError, match="no perturbations besides the control.*'perturbation'.*control='control'"):
        data.validate("library_nb")


@pytest.mark.parametrize("delimiter", ["+", None])
def test_empty_labels_are_named_like_missing_ones(delimiter):
    adata = make_screen()
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str)
    adata.obs.iloc[:3, adata.obs.columns.get_loc("perturbation")] = ["", " ", ""]
    with pytest.raises(DataError, match=r"3 cells have an empty label in obs\['perturbation'\].*label them"):
        from_anndata(adata, perturbation_key="perturbation", control="control", counts_layer="counts",
                     delimiter=delimiter)


@pytest.mark.parametrize("control", [0, "0", 0.0])
def test_whole_number_float_labels_read_as_integers(control):
    """An integer id column that a missing value once made float: 0.0 / 1.0 / ... are the
    labels "0", "1", ..., matched by control=0, "0" or 0.0 (and so in a categorical)."""
    adata = make_screen()
    ids = {name: float(i) for i, name in enumerate(pd.unique(adata.obs["perturbation"].astype(str)))}
    ids["control"] = 0.0
    ids = {name: (value if name == "control" else value + 1) for name, value in ids.items()}
    adata.obs["gid"] = adata.obs["perturbation"].astype(str).map(ids).astype(np.float64)
    data = from_anndata(adata, perturbation_key="gid", control=control, counts_layer="counts")
    assert "0" not in data.perturbation_names and all(name.isdigit() for name in data.perturbation_names)
    adata.obs["gid"] = adata.obs["gid"].astype("category")
    assert from_anndata(adata, perturbation_key="gid", control=control,
                        counts_layer="counts").perturbation_names == data.perturbation_names


def test_read_uns_reads_one_entry_of_a_file(tmp_path):
    """evaluate's default pathway gene sets: uns["pathways"] as prepare_replogle writes them."""
    from sams_jax.data.anndata_io import read_uns

    adata = make_screen()
    adata.uns["pathways"] = {"P1": ["A", "B"], "P2": ["C", "D", "E"]}
    write_h5ad(adata, tmp_path / "screen.h5ad")
    stored = read_uns(tmp_path / "screen.h5ad", "pathways")
    assert {name: [str(gene) for gene in genes] for name, genes in stored.items()} == adata.uns["pathways"]
    assert read_uns(tmp_path / "screen.h5ad", "other") is None


def test_an_unused_split_column_is_pointed_out():
    adata = make_screen()
    adata.obs["split"] = pd.Categorical(np.array(["train", "val", "test", "train"])[np.arange(adata.n_obs) % 4],
                                        categories=["train", "val", "test", "unused"])
    with pytest.warns(DataWarning, match=r"obs column\(s\) \['split'\] hold train / val / test labels but split_key "
                                         r"is not set.*split_key='split'"):
        from_anndata(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        from_anndata(adata, split_key="split")  # used: nothing to say
        from_anndata(adata, task="replogle")  # a task's split: split_key would be refused beside it
        from_anndata(adata, for_training=False)  # scoring data (Predictor.register): the split is not used
        adata.obs["split"] = np.where(np.arange(adata.n_obs) % 2, "train", "holdout")  # not split labels only
        from_anndata(adata)


def test_gene_symbols_are_carried_to_the_outputs():
    adata = make_screen()
    symbols = [f"SYM{i}" for i in range(adata.n_vars)]
    symbols[3] = np.nan  # a gene without a symbol keeps its name
    adata.var["symbol"] = symbols
    data = from_anndata(adata, gene_symbols_key="symbol")
    assert data.feature_symbols[:5] == ["SYM0", "SYM1", "SYM2", "gene3", "SYM4"]
    assert data.registration["gene_symbols_key"] == "symbol"
    assert from_anndata(adata).feature_symbols is None
    reordered = from_anndata(adata, gene_symbols_key="symbol", feature_names=list(adata.var_names[::-1]))
    assert reordered.feature_symbols == data.feature_symbols[::-1]  # follow the genes' order
    with pytest.raises(DataError, match=r"var has no column 'symbols'.*var columns: \['symbol'\].*gene_symbols_key"):
        from_anndata(adata, gene_symbols_key="symbols")
    adata.var["entrez"] = [np.nan if i == 1 else 1000.0 + i for i in range(adata.n_vars)]  # float for the NaN
    assert from_anndata(adata, gene_symbols_key="entrez").feature_symbols[:3] == ["1000", "gene1", "1002"]
    metadata = data.metadata("log_standardize")
    assert metadata["feature_symbols"][3] == "gene3"
    assert metadata_differences(metadata, from_anndata(adata).metadata("log_standardize")) == []  # display only

    predictor = _untrained_predictor(metadata)
    ate = predictor.ate([data.perturbation_names[0]], n_particles=4)
    assert ate.var["gene_symbol"].tolist() == metadata["feature_symbols"] and ate.var_names[3] == "gene3"
    assert predictor.sample(data.perturbation_names[0], n=2).var["gene_symbol"].iloc[0] == "SYM0"


def _untrained_predictor(metadata):
    """A freshly initialised small SAMS-VAE for data with this ``metadata`` (no training)."""
    from sams_jax.config import base_config
    from sams_jax.models import create_model
    from sams_jax.predictor import Predictor

    n_genes, n_perturbations = len(metadata["feature_names"]), len(metadata["perturbation_names"])
    config = base_config()
    config.model.update(n_latent=2, decoder_n_hidden=4, basal_encoder_n_hidden=4, embedding_encoder_n_hidden=4)
    model = create_model(config.model, n_genes, n_perturbations)
    variables = model.init({"params": jax.random.key(0), "globals": jax.random.key(1), "local": jax.random.key(2)},
                           np.zeros((2, n_genes), np.float32), np.zeros((2, n_perturbations), np.float32),
                           np.ones(2, np.float32))
    return Predictor(model, variables, config, metadata, 0, "")


def test_scored_data_must_fit_the_model_and_its_split():
    """Registered data meet the model by name: a PerturbationData with other dosage columns
    is refused, not matched by position; ``split=`` on an AnnData takes the run's split,
    which needs the training file (a shuffled copy splits otherwise); gene symbols given as
    gene names get a hint."""
    adata = make_screen()
    adata.var["symbol"] = [f"SYM{i}" for i in range(adata.n_vars)]
    data = from_anndata(adata, gene_symbols_key="symbol")  # a random split
    predictor = _untrained_predictor(data.metadata("log_standardize"))
    renamed = adata.copy()  # "A" called "AAA": the columns would shift by one
    renamed.obs["perturbation"] = renamed.obs["perturbation"].astype(str).str.replace(r"\bA\b", "AAA",
                                                                                       regex=True).to_numpy()
    shifted = from_anndata(renamed)
    with pytest.raises(DataError, match=r"dosage columns are not the model's perturbations \(6 columns for the "
                                        r"model's 6; the model's not among them: \['A'\]; not the model's: \['AAA'\]\)"
                                        r".*predictor.register\(adata\)"):
        predictor.iwelbo(shifted, n_particles=2)
    with pytest.raises(DataError, match="dosage columns are not the model's perturbations"):
        predictor.latent(PerturbationData(**{**vars(data), "x": sp.csr_matrix(data.x),  # the streamed path too
                                             "perturbation_names": data.perturbation_names[::-1]}))
    # split= on an AnnData: the run's split, registered as at training (here: the file itself)
    np.testing.assert_array_equal(predictor.iwelbo(adata, n_particles=2, split="test"),
                                  predictor.iwelbo(data, n_particles=2, split="test"))
    shuffled = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()
    with pytest.raises(DataError, match=r"not the run's training data as registered then: .*differ from the "
                                        r"checkpoint's metadata.*leave split= out"):
        predictor.latent(shuffled, split="test")
    assert predictor.iwelbo(shuffled, n_particles=2).shape == (adata.n_obs,)  # every cell: no split needed
    elsewhere = adata.copy()
    elsewhere.obs = elsewhere.obs.rename(columns={"perturbation": "gene"})
    with pytest.raises(DataError, match=r"obs has no column 'perturbation'.*\(this AnnData was read as the run's "
                                        r"training data were, perturbation_key='perturbation'") as caught:
        predictor.iwelbo(elsewhere, n_particles=2, split="test")
    assert "--config" not in str(caught.value)
    by_symbol = adata.copy()
    by_symbol.var_names = by_symbol.var["symbol"].to_numpy()
    with pytest.raises(DataError, match=r"12 of the data's gene names are the model's gene symbols"):
        predictor.iwelbo(by_symbol, n_particles=2)
    # the control asked for as an intervention: said; common random numbers give exactly 0
    from sams_jax.predictor import InterventionWarning

    with pytest.warns(InterventionWarning, match=r"\['control'\] is the control 'control': its ATE is 0 by definition"):
        effects = predictor.ate(["A", "control"], n_particles=4, method="crn")
    assert np.all(effects["control"].X == 0) and np.any(effects["A"].X != 0)


def test_registration_refuses_an_unknown_likelihood_and_reads_a_backed_anndata(tmp_path):
    from sams_jax.data.anndata_io import KNOWN_LIKELIHOODS
    from sams_jax.likelihoods import LIKELIHOODS

    assert KNOWN_LIKELIHOODS == LIKELIHOODS  # the data layer's copy of the model's list
    adata = make_screen()
    with pytest.raises(DataError, match=r"likelihood='nb' is not allowed; choose one of \['normal', 'poisson', "
                                        r"'library_nb'\]"):
        from_anndata(adata, likelihood="nb")
    path = tmp_path / "screen.h5ad"
    write_h5ad(adata, path)
    opened = anndata.read_h5ad(path, backed="r")  # an AnnData opened backed: its file is read backed
    try:
        from_object = from_anndata(opened, backed=True)
        with pytest.raises(DataError, match=r"a view of a backed AnnData \(e.g. adata\[:40\]\) cannot be registered "
                                            "backed"):
            from_anndata(opened[:40], backed=True)
        opened.obs["perturbation"] = opened.obs["perturbation"].astype(str).replace("control", "ctrl")
        relabelled = from_anndata(opened, backed=True, control="ctrl")  # obs as edited in memory, not the file's
    finally:
        opened.file.close()
    from_path = from_anndata(str(path), backed=True)
    assert type(from_object.x).__name__ == "BackedMatrix" and relabelled.control == "ctrl"
    np.testing.assert_array_equal(relabelled.dosages, from_path.dosages)
    np.testing.assert_array_equal(from_object.x[np.arange(5)].toarray(), from_path.x[np.arange(5)].toarray())
    with pytest.raises(DataError, match="backed reading needs the path of a .h5ad file"):
        from_anndata(adata, backed=True)


def test_measured_against_a_perturbation_the_control_cells_are_an_intervention_where_labelled():
    """evaluate --control A: the data's control cells (all-zero dosages) are scored against
    A where the data name them; data registered with control=None leave them out (they have
    no name to ask the model for)."""
    from sams_jax.evaluate import observed_interventions

    norman = make_norman_like(make_screen())
    for control, expected in (("control", ["control", "B"]), (None, ["B", "C"])):
        data = from_anndata(norman, guide_column_pattern="guide_", perturbation_key="guide_identity",
                            counts_layer="counts", control=control)
        predictor = _untrained_predictor(data.metadata("log_standardize"))
        assert (data.dosages.sum(1) == 0).sum() == 30
        names, rows, _, n_cells = observed_interventions(predictor, data, predictor.control_dosage("A"))
        assert names[:2] == expected and "A" not in names
        assert predictor.expectations(names[:1], n_particles=2).shape == (1, data.n_genes)  # each name resolves
