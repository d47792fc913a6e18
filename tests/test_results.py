"""The results.json contract: the typed model, its documentation, and errors on bad files."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from fedsecmem.config import load_config
from fedsecmem.errors import UserError
from fedsecmem.methods import METHODS, implementation, spec
from fedsecmem.run.results import SCHEMA_VERSION, Results, load_results

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.products=[brick,immunohistochemistry]", "data.train_per_product=6", "data.test_normal_per_product=4",
        "data.test_defect_per_product=4", "data.image_size=64", "data.crop_size=64", "clients.n=2",
        "clients.alpha=1.0", "output.embedding_cache=null", "audit.leakage=false",
        "output.map_examples_per_product=0"]


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    """``model`` and every model its fields hold (in lists and dicts too)."""
    out, todo = [], [model]
    while todo:
        m = todo.pop()
        if m in out:
            continue
        out.append(m)
        for f in m.model_fields.values():
            for t in [f.annotation, *typing.get_args(f.annotation)]:
                for a in [t, *typing.get_args(t)]:
                    if isinstance(a, type) and issubclass(a, BaseModel):
                        todo.append(a)
    return out


def test_every_field_of_the_contract_is_documented():
    doc = (ROOT / "docs" / "results.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+)`", doc))
    missing = sorted({name for m in _models(Results) for name in m.model_fields} - documented)
    assert not missing, f"fields of results.json missing from docs/results.md: {missing}"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    from fedsecmem.run.runner import run

    out = tmp_path_factory.mktemp("local")
    run(load_config(ROOT / "configs" / "quickstart.yaml", ["method=local", *TINY]), out)
    return out


def test_a_run_writes_a_document_the_model_reads_back_unchanged(local_run):
    written = json.loads((local_run / "results.json").read_text())
    results = load_results(local_run)
    assert results.schema_version == SCHEMA_VERSION and results.method == "local"
    assert results.to_json() == written  # nothing lost or added on the way through the model
    assert results.auroc.image == pytest.approx(sum(c.auroc_image for c in results.per_client) / 2)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["auroc"].pop("image"), "auroc.image: Field required"),
    (lambda d: d.update(rounds="three"), "rounds: Input should be a valid integer"),
    (lambda d: d.update(surprise=1), "surprise: Extra inputs are not permitted"),
    (lambda d: d["comm"]["bytes_up"].append("x"), "comm.bytes_up.2: Input should be a valid array"),
])
def test_a_malformed_results_file_is_one_line_naming_the_field(local_run, tmp_path, edit, message):
    doc = json.loads((local_run / "results.json").read_text())
    edit(doc)
    (tmp_path / "results.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=re.escape(message)) as err:
        load_results(tmp_path)
    assert "\n" not in str(err.value)


def test_no_results_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no results.json"):
        load_results(tmp_path)


def test_every_registered_method_has_its_implementation_and_the_config_accepts_exactly_them():
    from fedsecmem.config import RunConfig

    assert typing.get_args(RunConfig.model_fields["method"].annotation) == tuple(METHODS)
    for name in METHODS:
        assert callable(implementation(name)) and spec(name).name == name
