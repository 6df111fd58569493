"""TFDS catalog datasets: read through array_record without TensorFlow, and the errors that say what to do.

Everything runs offline.  Downloads fail for real (TFDS's own downloader, through `requests`) because the
`offline` fixture points the HTTP(S) proxy at a closed local port and turns TFDS's 10 retries with
backoff (3.4 minutes per URL) off.  Where a builder must get past its download (to reach the code that
needs TensorFlow, or to prepare a real catalog dataset), the file is put into TFDS's download cache under
the name TFDS gives the registered URL and checksum; TFDS then skips the download ("File cached") and runs
the catalog builder's own code on it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import import_or_fail  # noqa: E402

import_or_fail("tensorflow_datasets")
import_or_fail("array_record")

from conftest import subprocess_env  # noqa: E402
from test_tfds_sources import _TensorflowImportSpy  # noqa: E402

from llm_jax.data import tfds_catalog  # noqa: E402
from llm_jax.data.tfds_catalog import CatalogError, UnknownSplitError, catalog_source, text_of  # noqa: E402

HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None
HAS_BEAM = importlib.util.find_spec("apache_beam") is not None


@pytest.fixture
def offline(monkeypatch):
    """Downloads fail at once: no retries, and every HTTP(S) request goes to a proxy that refuses."""
    from tensorflow_datasets.core.download import downloader

    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)


def _builder(name, data_dir):
    return tfds_catalog._builder(tfds_catalog._tfds(), name, str(data_dir))


def _seed_download_cache(name, data_dir, content: bytes) -> list[str]:
    """Puts `content` into TFDS's download cache for every URL `name`'s builder downloads."""
    from etils import epath
    from tensorflow_datasets.core.download import resource as resource_lib

    builder = _builder(name, data_dir)
    paths = []
    for url, info in type(builder).url_infos.items():
        resource = resource_lib.Resource(url=url)
        path = epath.Path(data_dir) / "downloads" / builder.name / resource.relative_download_dir
        path /= resource_lib.get_dl_fname(url, info.checksum)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        resource_lib.get_info_path(path).write_text(json.dumps({"urls": [url], "original_fname": info.filename}))
        paths.append(path)
    assert paths, f"{name} downloads nothing"
    return paths


def _preparing_fails(name, data_dir) -> tuple[CatalogError, float]:
    """The CatalogError of preparing `name` in `data_dir`, and how many seconds it took to come."""
    start = time.monotonic()
    with pytest.raises(CatalogError) as excinfo:
        catalog_source(name, "train", str(data_dir))
    return excinfo.value, time.monotonic() - start


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


# ----------------------------------------------------------------------------------------------------
# Names, configs and versions


@pytest.mark.parametrize(
    "name, suggestion",
    [("tiny_shakespear", "tiny_shakespeare"), ("imdb_review", "imdb_reviews"), ("glu/sst2", "glue")],
)
def test_unknown_name_suggests_close_matches(tmp_path, name, suggestion):
    with pytest.raises(CatalogError, match=rf"'{name}' is not a dataset of the TFDS catalog") as excinfo:
        catalog_source(name, "train", str(tmp_path))
    assert f"did you mean '{suggestion}'" in str(excinfo.value)
    assert "data.source=text_file" in str(excinfo.value)
    assert type(excinfo.value.__cause__).__name__ == "DatasetNotFoundError"


def test_wikitext_is_not_in_this_catalog(tmp_path):
    # tensorflow-datasets 4.9.x has no wikitext builder (only "huggingface:wikitext", which needs `datasets`)
    with pytest.raises(CatalogError, match="'wikitext/wikitext-2-raw-v1' is not a dataset of the TFDS catalog"):
        catalog_source("wikitext/wikitext-2-raw-v1", "train", str(tmp_path))


def test_legacy_builders_are_found(tmp_path):
    # TFDS alone stops importing its legacy builders at the first ImportError (h5py): glue, c4, wikipedia
    # would be "not found"
    for name in ("glue/sst2", "c4/en:3.1.0", "wikipedia/20230601.en", "lm1b"):
        assert _builder(name, tmp_path).info.full_name.startswith(name.split(":")[0])


def test_unknown_config_and_version_list_the_alternatives(tmp_path):
    with pytest.raises(CatalogError, match=r"'glue/sst3': BuilderConfig sst3 not found.*configs: cola, sst2, mrpc"):
        catalog_source("glue/sst3", "train", str(tmp_path))
    with pytest.raises(CatalogError, match=r"'lm1b:9.9.9': .*versions: 1.1.0"):
        catalog_source("lm1b:9.9.9", "train", str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# Not prepared, and preparing fails: the error says what to do


def test_not_prepared_and_prepare_false(tmp_path):
    with pytest.raises(CatalogError, match=rf"'lm1b' is not prepared in data_dir {tmp_path} "):
        catalog_source("lm1b", "train", str(tmp_path), prepare=False)
    assert not (tmp_path / "lm1b").exists()


def test_default_data_dir_honours_tfds_data_dir(tmp_path):
    # TFDS reads $TFDS_DATA_DIR once, when it is imported: a fresh process
    env = subprocess_env()
    env["TFDS_DATA_DIR"] = str(tmp_path / "tfds_home")
    code = (
        "from llm_jax.data.tfds_catalog import catalog_source\n"
        "try:\n    catalog_source('lm1b', 'train', None, prepare=False)\n"
        "except ValueError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"'lm1b' is not prepared in data_dir {tmp_path}/tfds_home (TFDS's default" in result.stdout


@pytest.mark.skipif(HAS_TENSORFLOW, reason="TensorFlow is installed: tiny_shakespeare would prepare")
def test_builder_that_needs_tensorflow(tmp_path, offline):
    # tiny_shakespeare reads its download with tf.io.gfile: give it the download, so that the real builder
    # gets that far
    _seed_download_cache("tiny_shakespeare", tmp_path, b"First Citizen:\nBefore we proceed any further, hear me.\n")
    error, _ = _preparing_fails("tiny_shakespeare", tmp_path)
    assert "needs TensorFlow" in str(error) and "pip install 'llm_jax[tfds-prepare]'" in str(error)
    assert "tfds build tiny_shakespeare --file_format=array_record" in str(error)
    import_errors = [e for e in _chain(error) if isinstance(e, ImportError)]
    assert import_errors and import_errors[0].name == "tensorflow"
    assert not (tmp_path / "tiny_shakespeare" / "1.0.0").exists()  # nothing half-prepared


@pytest.mark.skipif(HAS_BEAM, reason="Apache Beam is installed: the builder would start downloading")
@pytest.mark.parametrize("name", ["c4/en", "wikipedia/20230601.en"])
def test_beam_dataset(tmp_path, offline, name):
    error, seconds = _preparing_fails(name, tmp_path)
    assert "Apache Beam" in str(error) and "pip install 'llm_jax[tfds-prepare]'" in str(error)
    assert "prepared on a cluster" in str(error) and "point data_dir at the result" in str(error)
    assert seconds < 5
    assert not (tmp_path / "downloads").exists()  # it failed before downloading anything


@pytest.mark.parametrize("name", ["imdb_reviews", "glue/sst2"])
def test_download_fails_offline(tmp_path, offline, name):
    import requests

    error, seconds = _preparing_fails(name, tmp_path)
    message = str(error)
    assert f"the TFDS dataset '{name}' could not be downloaded" in message
    assert f"data_dir {tmp_path}" in message
    assert "--config.data.source=text_file --config.data.path=FILE" in message
    assert "copy an already prepared TFDS directory" in message
    assert isinstance(error.__cause__, requests.RequestException)
    assert seconds < 10
    with pytest.raises(CatalogError, match="is not prepared"):
        catalog_source(name, "train", str(tmp_path), prepare=False)


# ----------------------------------------------------------------------------------------------------
# A real catalog dataset, prepared and read back through array_record

DOLLY = [
    {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
    {"instruction": "Summarise.", "context": "Le café était fermé — ünïcode.", "response": "Closed.",
     "category": "summarization"},  # fmt: skip
    {"instruction": "Count to two.", "context": "", "response": "1, 2", "category": "brainstorming"},
]


@pytest.fixture
def dolly_dir(tmp_path, offline):
    """databricks_dolly (one JSONL download, parsed without TensorFlow) with 3 records in its download cache."""
    data_dir = tmp_path / "tfds"
    content = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in DOLLY).encode("utf-8")
    _seed_download_cache("databricks_dolly", data_dir, content)
    return data_dir


def _key(record):
    return record["instruction"]


def test_prepares_and_reads_a_catalog_dataset(dolly_dir):
    spy = _TensorflowImportSpy()
    sys.meta_path.insert(0, spy)
    try:
        source = catalog_source("databricks_dolly", "train", str(dolly_dir))
    finally:
        sys.meta_path.remove(spy)
    assert not spy.attempts, f"preparing or reading tried to import TensorFlow: {spy.attempts[:5]}"
    assert isinstance(source, tfds_catalog.DecodedDataSource)
    records = sorted((source[i] for i in range(len(source))), key=_key)
    assert records == sorted(DOLLY, key=_key)  # str values: decoded from the array_record bytes
    assert sorted(text_of(r, None) for r in records) == [
        "Count to two.\n1, 2",
        "Name a colour.\nBlue.",
        "Summarise.\nLe café était fermé — ünïcode.\nClosed.",
    ]
    version_dir = dolly_dir / "databricks_dolly" / "1.0.0"
    shards = [f for f in os.listdir(version_dir) if ".array_record-" in f]
    assert shards, os.listdir(version_dir)
    with open(version_dir / "dataset_info.json") as f:
        assert json.load(f)["fileFormat"] == "array_record"
    assert "tensorflow" not in sys.modules

    # prepared: read again without preparing (and without the download)
    import shutil

    shutil.rmtree(dolly_dir / "downloads")
    again = catalog_source("databricks_dolly", "train", str(dolly_dir), prepare=False)
    assert sorted(list(again), key=_key) == records
    assert len(catalog_source("databricks_dolly", "train[:2]", str(dolly_dir))) == 2
    with pytest.raises(UnknownSplitError, match="'databricks_dolly' has no split 'validation': its splits are train"):
        catalog_source("databricks_dolly", "validation", str(dolly_dir))


def test_waits_for_another_preparer_and_rechecks(dolly_dir, caplog):
    builder = _builder("databricks_dolly", dolly_dir)
    lock_path = tfds_catalog._lock_path(builder)
    results = {}

    def read():
        try:
            results["source"] = catalog_source("databricks_dolly", "train", str(dolly_dir))
        except Exception as error:  # noqa: BLE001  (reported by the assertion below)
            results["error"] = error

    caplog.set_level(logging.INFO, logger=tfds_catalog.__name__)
    with tfds_catalog.exclusive_lock(lock_path):  # another process is preparing
        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.5)
        assert reader.is_alive(), results  # waiting for the lock
        with tfds_catalog.quiet_progress():
            builder.download_and_prepare(file_format="array_record")
    reader.join(timeout=60)
    assert "error" not in results, results
    assert len(results["source"]) == len(DOLLY)
    assert "databricks_dolly was prepared meanwhile by another process" in caplog.text
    assert "preparing the TFDS dataset" not in caplog.text


def test_prepared_as_tfrecord(tmp_path):
    # What `tfds build` writes by default: dataset_info.json says tfrecord (no array_record shards)
    builder = _builder("databricks_dolly", tmp_path)
    builder.info.set_file_format("tfrecord")
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    with pytest.raises(CatalogError) as excinfo:
        catalog_source("databricks_dolly", "train", str(tmp_path))
    message = str(excinfo.value)
    assert "in the tfrecord format" in message and "needs array_record" in message
    assert f"tfds convert_format --dataset_version_dir={builder.data_path} --out_file_format=array_record" in message
    assert "pip install 'llm_jax[tfds-prepare]'" in message


# ----------------------------------------------------------------------------------------------------
# text_of


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"text": "lm1b line"}, "lm1b line"),
        ({"sentence": "a film", "label": 1, "idx": 3}, "a film"),  # glue/sst2
        ({"sentence1": "one", "sentence2": "two", "label": 0}, "one\ntwo"),  # glue/mrpc
        ({"question1": "q1", "question2": "q2", "label": 1}, "q1\nq2"),  # glue/qqp
        ({"premise": "p", "hypothesis": "h", "label": 2}, "p\nh"),  # glue/mnli
        ({"question": "q", "sentence": "s", "label": 0}, "q\ns"),  # glue/qnli: not just "sentence"
        ({"article": "story", "highlights": "short", "id": "x"}, "story"),  # cnn_dailymail
        ({"document": "doc", "summary": "sum"}, "doc"),  # xsum
        ({"content": b"bytes \xc3\xa9"}, "bytes é"),
        ({"instruction": "i", "context": "", "response": "r"}, "i\nr"),  # empty fields left out
    ],
)
def test_text_of_known_layouts(record, expected):
    assert text_of(record, None) == expected


def test_text_of_named_field_and_errors():
    record = {"title": "T", "text": "body", "label": 3}
    assert text_of(record, "title") == "T"
    with pytest.raises(CatalogError, match=r"no field 'body': they have \['label', 'text', 'title'\]"):
        text_of(record, "body")
    with pytest.raises(CatalogError, match="'label' is int, not text"):
        text_of(record, "label")
    with pytest.raises(CatalogError, match=r"no known text field .*\['answer', 'id'\].*data.text_field"):
        text_of({"id": 1, "answer": "x"}, None)


def test_catalog_dataset_feeds_the_training_pipeline(dolly_dir):
    """data.source=tfds: the catalog's train split, the last record held out (no validation split), packed."""
    from llm_jax import config as config_lib
    from llm_jax.data.pipeline import build_data

    config = config_lib.default_config()
    config.data.update(source="tfds", tfds_name="databricks_dolly", tfds_data_dir=str(dolly_dir), tokenizer="byte",
                       seq_len=8, validation_fraction=0.34)
    config.train.batch_size = 2
    data = build_data(config)
    rows = data.train.next_chunk(12)
    stream = bytes(np.concatenate([rows["inputs"][..., :1], rows["targets"]], -1).reshape(-1).tolist()).decode(
        "utf-8", errors="replace")
    evaluation = bytes(next(data.eval_batches("validation", 1))["inputs"].reshape(-1).tolist()).decode(
        "utf-8", errors="replace")
    texts = {text_of(record) for record in DOLLY}
    train_texts = {text for text in texts if text[:10] in stream}
    assert len(train_texts) == 2 and not any(text[:10] in evaluation for text in train_texts)
    assert (texts - train_texts).pop()[:6] in evaluation
