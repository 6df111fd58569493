"""TFDS catalog datasets ("lm1b", "glue/sst2", "imdb_reviews", "c4/en:3.1.0", ...) read without TensorFlow.

`catalog_source(name, split, data_dir)` opens `split` of a catalog dataset prepared in `data_dir` as a
random-access source of decoded records (`tfds_sources.DecodedDataSource`: `len()`, `[i]`, `str` texts)
through `builder.as_data_source`, which reads array_record files and needs no TensorFlow.

The path, step by step:
1. `tfds.builder(name, data_dir=data_dir)` (`data_dir=None`: TFDS's default, `$TFDS_DATA_DIR` as it was
   when TFDS was imported, or `~/tensorflow_datasets`).  An unknown name, config or version raises
   `CatalogError` with close matches or the configs and versions there are.
2. Prepared in array_record (or another random-access format): read it; an unknown split raises
   `UnknownSplitError` (a `CatalogError`) listing the splits.  Prepared only in tfrecord: `CatalogError`
   saying how to convert it (that needs TensorFlow, once, on some machine).
3. Not prepared: with `prepare=False`, `CatalogError`; else `download_and_prepare(file_format=
   "array_record")` under an exclusive `fcntl.flock` on `data_dir/.<name_config_version>.prepare.lock`
   (local processes wait for one another; whoever comes second finds the dataset prepared).  Failures become a `CatalogError` that says what to do: builders that need
   TensorFlow (e.g. tiny_shakespeare reads with `tf.io.gfile`; every archive extraction uses it too) or
   Apache Beam (c4, wikipedia) name the extra `llm_jax[tfds-prepare]`; failed downloads point at local
   files (`--config.data.source=text_file`) or at copying a prepared directory into `data_dir`.  The
   original exception stays chained.  Anything else propagates unchanged.

tensorflow-datasets 4.9.10 without TensorFlow: TFDS imports its legacy builders (`text`: c4, glue, wikipedia, ...) in one loop that stops at the first
  ImportError (`nearest_neighbors` needs h5py), so those names are "not found"; they are imported here
  one module at a time (once, on first use). `DatasetBuilder.code_path` needs the `importlib_resources`
  backport, which TFDS declares only for Python < 3.9: setup.py installs it.

`text_of(record, text_field)` picks the training text of a decoded record.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import logging
import os
import re
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from llm_jax.data.tfds_sources import DecodedDataSource, exclusive_lock, quiet_progress

if TYPE_CHECKING:  # tensorflow_datasets is imported on first use only
    from tensorflow_datasets.core import DatasetBuilder

logger = logging.getLogger(__name__)

EXTRA = "llm_jax[tfds-prepare]"
INSTALL_EXTRA = f"pip install '{EXTRA}'"
LOCAL_FILES = (
    "To train on local files instead, use --config.data.source=text_file --config.data.path=FILE "
    "(or data.source=jsonl / tsv)"
)
# The packages tensorflow_datasets.core.registered._import_legacy_builders imports (TFDS 4.9.10)
LEGACY_BUILDER_MODULES = (
    "audio", "graphs", "image", "image_classification", "object_detection", "nearest_neighbors",
    "question_answering", "d4rl", "ranking", "recommendation", "rl_unplugged", "rlds.datasets", "robotics",
    "robomimic", "structured", "summarization", "text", "text_simplification", "time_series", "translate",
    "video", "vision_language",
)  # fmt: skip
# text_of: single text features, and layouts of several features joined by newlines (checked first)
TEXT_KEYS = ("text", "sentence", "content", "article", "document", "review", "passage", "book_text", "body",
             "abstract", "dialogue")  # fmt: skip
TEXT_LAYOUTS = (
    ("sentence1", "sentence2"),  # glue/mrpc, rte, wnli
    ("question1", "question2"),  # glue/qqp
    ("premise", "hypothesis"),  # glue/mnli, snli
    ("question", "sentence"),  # glue/qnli
    ("question", "passage"),  # bool_q
    ("instruction", "context", "response"),  # databricks_dolly
    ("instruction", "response"),
)


class CatalogError(ValueError):
    """A catalog dataset cannot be read; the message says what to do."""


class UnknownSplitError(CatalogError):
    """The dataset has no such split (the message lists the splits it has)."""


# ----------------------------------------------------------------------------------------------------
# TFDS, imported on first use


@functools.cache
def _tfds() -> ModuleType:
    """tensorflow_datasets with its whole catalog registered."""
    import tensorflow_datasets as tfds

    for module in LEGACY_BUILDER_MODULES:
        try:
            importlib.import_module(f"tensorflow_datasets.{module}")
        except Exception as error:  # noqa: BLE001  (a missing optional package hides only that family)
            logger.debug("TFDS builders in tensorflow_datasets.%s are unavailable: %s", module, error)
    return tfds


def _where(data_dir: str | None, builder: DatasetBuilder) -> str:
    """The data_dir that `builder` reads and prepares in, for messages."""
    root = os.fspath(builder.data_dir_root)
    return root if data_dir is not None else f"{root} (TFDS's default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"


def _suggestions(tfds: ModuleType, name: str) -> list[str]:
    """Catalog names close to `name` (difflib), plus names containing it."""
    try:
        query = tfds.core.naming.parse_builder_name_kwargs(name)[0].name.lower()
    except Exception:  # noqa: BLE001  (only for the message)
        query = name.lower()
    names = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(query, names, n=5, cutoff=0.6)
    containing = [n for n in names if len(query) >= 3 and query in n]
    return list(dict.fromkeys(close + containing))[:6]


def _variants(tfds: ModuleType, name: str) -> str:
    """The configs and versions of `name`'s builder, for error messages."""
    try:
        dataset, _ = tfds.core.naming.parse_builder_name_kwargs(name)
        cls = tfds.builder_cls(str(dataset))
    except Exception:  # noqa: BLE001  (only for the message)
        return ""
    configs = [config.name for config in cls.BUILDER_CONFIGS or ()]
    versions = sorted({str(v) for v in [cls.VERSION, *getattr(cls, "SUPPORTED_VERSIONS", ())] if v})
    parts = [("configs", configs), ("versions", versions)]
    return "; ".join(f"{label}: {', '.join(values)}" for label, values in parts if values)


def _builder(tfds: ModuleType, name: str, data_dir: str | None) -> DatasetBuilder:
    """`tfds.builder(name, data_dir=data_dir)`, with errors that name the alternatives."""
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as error:
        matches = _suggestions(tfds, name)
        hint = f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""
        raise CatalogError(
            f"{name!r} is not a dataset of the TFDS catalog (tensorflow-datasets {tfds.__version__}){hint} "
            f"tfds.list_builders() lists the names.  {LOCAL_FILES}"
        ) from error
    except ImportError as error:  # e.g. "huggingface:..." needs the `datasets` package
        raise CatalogError(f"{name!r} needs the Python package {error.name!r}: pip install {error.name}") from error
    except (ValueError, AssertionError) as error:  # unknown config or version
        # TFDS: 'Failed to construct dataset "glue", builder_kwargs "{...}": BuilderConfig sst3 not found ...'
        reason = re.sub(r'^Failed to construct dataset .*?": ', "", str(error).strip()).split(". Here are")[0]
        variants = _variants(tfds, name)
        reason = reason.splitlines()[0] if reason else type(error).__name__
        raise CatalogError(f"{name!r}: {reason}" + (f" ({variants})" if variants else "")) from error


# ----------------------------------------------------------------------------------------------------
# Preparing


def _is_prepared(builder: DatasetBuilder) -> bool:
    """`builder.is_prepared()`, without the warning TFDS logs for a missing dataset directory."""
    return (builder.data_path / "dataset_info.json").exists() and builder.is_prepared()


def _lock_path(builder: DatasetBuilder) -> str:
    """The lock file of one dataset variant (name/config/version) under its data_dir."""
    variant = re.sub(r"[^\w.-]", "_", builder.info.full_name)
    return os.path.join(os.fspath(builder.data_dir_root), f".{variant}.prepare.lock")


def _uses_beam(tfds: ModuleType, builder: DatasetBuilder) -> bool:
    """Whether `builder` generates its dataset with an Apache Beam pipeline."""
    import inspect

    if isinstance(builder, tfds.core.BeamBasedBuilder):
        return True
    return "pipeline" in inspect.signature(builder._split_generators).parameters  # noqa: SLF001


def _beam_message(name: str, builder: DatasetBuilder, where: str) -> str:
    """What to do when preparing the Beam dataset `name` needs Apache Beam."""
    return (
        f"{name!r} is an Apache Beam dataset: preparing it needs Apache Beam (and TensorFlow): "
        f"{INSTALL_EXTRA}.  Beam datasets of this size are normally prepared on a cluster, e.g. "
        f"`tfds build {name} --file_format=array_record --data_dir=gs://BUCKET/tensorflow_datasets "
        f"--beam_pipeline_options=runner=DataflowRunner,...`; then point data_dir at the result (or copy "
        f"its {builder.info.full_name} directory into {where}).  {LOCAL_FILES}"
    )


def _import_failure(error: ImportError, name: str, builder: DatasetBuilder, where: str) -> CatalogError | None:
    """The CatalogError for a package that preparing `name` imported and did not find."""
    module = (error.name or "").split(".")[0]
    if module == "tensorflow":
        return CatalogError(
            f"preparing {name!r} needs TensorFlow (this TFDS builder reads or extracts its downloads with "
            f"tf.io), which is not installed: {INSTALL_EXTRA}, then call again; or prepare it on a machine "
            f"with TensorFlow (`tfds build {name} --file_format=array_record --data_dir=DIR`) and copy "
            f"DIR/{builder.info.full_name} into {where}.  Reading needs no TensorFlow.  {LOCAL_FILES}"
        )
    if module == "apache_beam":
        return CatalogError(_beam_message(name, builder, where))
    if module:
        return CatalogError(f"preparing {name!r} needs the Python package {module!r}: pip install {module}")
    return None


def _download_failure(error: BaseException) -> bool:
    """Whether `error` is a failed download (network, HTTP status, checksum)."""
    import socket
    import urllib.error

    import requests
    from tensorflow_datasets.core import download
    from tensorflow_datasets.core.download import download_manager

    download_errors = (
        requests.RequestException, urllib.error.URLError, socket.gaierror, ConnectionError, TimeoutError,
        download.DownloadError, download_manager.NonMatchingChecksumError,
    )  # fmt: skip
    return isinstance(error, download_errors)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or while handling."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _classify(error: Exception, name: str, builder: DatasetBuilder, where: str) -> CatalogError | None:
    """The CatalogError for a failed `download_and_prepare`, or None when the failure is not understood."""
    chain = list(_chain(error))
    for link in chain:
        if isinstance(link, ImportError) and (failure := _import_failure(link, name, builder, where)):
            return failure
    download = next((link for link in chain if _download_failure(link)), None)
    if download is not None:
        return CatalogError(
            f"the TFDS dataset {name!r} could not be downloaded, and it is not prepared in data_dir {where}.  "
            f"{LOCAL_FILES}; or copy an already prepared TFDS directory ({builder.info.full_name}, array_record) "
            f"into that data_dir.  The download failed with {type(download).__name__}: {str(download)[:300]}"
        )
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) and "manual" in str(error).lower():
        manual = os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")
        return CatalogError(
            f"{name!r} needs files downloaded by hand into {manual}: "
            f"{' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}"
        )
    return None


def _prepare(tfds: ModuleType, name: str, data_dir: str | None, builder: DatasetBuilder) -> DatasetBuilder:
    """Prepares `builder`'s dataset in array_record under the lock; returns a builder that reads it."""
    with exclusive_lock(_lock_path(builder)):
        builder = _builder(tfds, name, data_dir)
        if _is_prepared(builder):
            logger.info("%s was prepared meanwhile by another process in %s", name, builder.data_path)
            return builder
        where = _where(data_dir, builder)
        if _uses_beam(tfds, builder) and importlib.util.find_spec("apache_beam") is None:
            raise CatalogError(_beam_message(name, builder, where))
        logger.info("preparing the TFDS dataset %s in %s (array_record)", name, builder.data_path)
        config = tfds.download.DownloadConfig(try_download_gcs=False)
        try:
            with quiet_progress():
                builder.download_and_prepare(file_format="array_record", download_config=config)
        except Exception as error:
            failure = _classify(error, name, builder, where)
            logger.warning("preparing %s failed: %s: %s", name, type(error).__name__, error)
            if failure is None:
                raise
            raise failure from error
        logger.info("prepared %s in %s", name, builder.data_path)
        return _builder(tfds, name, data_dir)  # the info as written, with the splits


# ----------------------------------------------------------------------------------------------------
# Reading


def _split_names(split: str) -> list[str]:
    """The split names in a TFDS split spec ("train", "train[:10%]", "train+validation")."""
    return [part.split("[", 1)[0].strip() for part in split.split("+")]


def _open(builder: DatasetBuilder, name: str, split: str) -> DecodedDataSource:
    """`split` of the prepared dataset of `builder`, if it is in a random-access format and has that split."""
    from tensorflow_datasets.core import file_adapters

    info = builder.info
    if not info.available_file_formats() & file_adapters.FileFormat.with_random_access():
        formats = ", ".join(sorted(f.value for f in info.available_file_formats())) or "unknown"
        raise CatalogError(
            f"{name!r} is prepared in {builder.data_path} in the {formats} format, but reading without "
            "TensorFlow (tfds.data_source) needs array_record.  On a machine with TensorFlow "
            f"({INSTALL_EXTRA}) convert it in place: `tfds convert_format --dataset_version_dir="
            f"{builder.data_path} --out_file_format=array_record`, or prepare it again: `tfds build {name} "
            "--file_format=array_record --data_dir=ANOTHER_DIR` and read from ANOTHER_DIR"
        )
    missing = [s for s in _split_names(split) if s not in info.splits]
    if missing:
        raise UnknownSplitError(
            f"{name!r} has no split {missing[0]!r}: its splits are {', '.join(sorted(info.splits))}"
        )
    logger.info("reading %s split %s from %s", name, split, builder.data_path)
    return DecodedDataSource(builder.as_data_source(split=split))


def catalog_source(name: str, split: str, data_dir: str | None, *, prepare: bool = True) -> DecodedDataSource:
    """Random-access records of `split` of the TFDS catalog dataset `name` (e.g. "lm1b", "glue/sst2",
    "imdb_reviews", "c4/en", optionally with ":VERSION") read through tfds.data_source (array_record, no
    TensorFlow); prepared first in `data_dir` (None: TFDS's default) when it is not and `prepare` is true."""
    tfds = _tfds()
    builder = _builder(tfds, name, data_dir)
    if not _is_prepared(builder):
        if not prepare:
            raise CatalogError(
                f"{name!r} is not prepared in data_dir {_where(data_dir, builder)} (looked for "
                f"{builder.data_path}); call with prepare=True, or copy a prepared array_record "
                f"{builder.info.full_name} directory there"
            )
        builder = _prepare(tfds, name, data_dir, builder)
    return _open(builder, name, split)


# ----------------------------------------------------------------------------------------------------
# Texts


def _as_text(record: Mapping[str, Any], key: str) -> str:
    """record[key] as a str (bytes are decoded as UTF-8)."""
    value = record[key]
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise CatalogError(f"record field {key!r} is {type(value).__name__}, not text (fields: {sorted(record)})")
    return value


def text_of(record: Mapping[str, Any], text_field: str | None = None) -> str:
    """The training text of a decoded record: record[text_field] when given; else the fields of the first
    known layout present (e.g. glue/mrpc's "sentence1", "sentence2"), non-empty ones joined by newlines; else
    the first known text field ("text", "sentence", "content", "article", "document", ...)."""
    if text_field:
        if text_field not in record:
            raise CatalogError(f"the records have no field {text_field!r}: they have {sorted(record)}")
        return _as_text(record, text_field)
    for layout in TEXT_LAYOUTS:
        if all(key in record for key in layout):
            return "\n".join(text for text in (_as_text(record, key) for key in layout) if text)
    for key in TEXT_KEYS:
        if key in record:
            return _as_text(record, key)
    raise CatalogError(
        f"no known text field in the records (they have {sorted(record)}): set --config.data.text_field "
        "to the field to train on"
    )
