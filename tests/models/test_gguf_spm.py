"""SentencePiece GGUF vocabularies (``tokenizer.ggml.model == "llama"``: Llama 2, Mistral v0.1, Gemma files):
pdbox's tokenizer gives the ids and text transformers' own GGUF conversion gives, on the engine side and the
router side alike, and a tiny Gemma 2 with such a vocabulary generates."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from appliance.model.errors import ModelLoadError
from appliance.model.gguf_spm import spm_tokenizer
from appliance.model.loader import load_checkpoint, load_tokenizer
from appliance.model.tokenizer import Tokenizer
from tests.models.gguf_tiny import convert
from tests.models.hf_tiny import randomize
from tests.models.spm_vocab import gguf_metadata, spm_vocab
from tests.models.test_gguf_families import gemma2

TEXTS = ["The capital of France is", "The  capital   of\n\nFrance\tis", " leading space", "naïve café 日本語 🙂",
         "12 123 1234 2024-05-01 3.14", "<start_of_turn>user\nThe capital<end_of_turn>\n<start_of_turn>model\n",
         "<s>the</s> <think>is</think><unk>", "", "Tthe  \n", "   ", "bdy uvwx gkm"]


def spm_gguf(folder, arch: str, spm: dict | None = None, add_bos: bool | None = None):
    """A tiny ``arch`` ("llama" or "gemma2") GGUF file with the hand-made SentencePiece vocabulary (``spm``:
    keys to change in it; ``add_bos``: ``tokenizer.ggml.add_bos_token``, absent when None)."""
    vocab = spm_vocab(gemma=arch == "gemma2")
    if arch == "gemma2":
        _, model_cls, config, extra = gemma2()
    else:
        model_cls, extra = LlamaForCausalLM, {}
        config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, num_hidden_layers=2)
    config.vocab_size, config.bos_token_id, config.eos_token_id = len(vocab["tokens"]), vocab["bos"], vocab["eos"]
    config.pad_token_id = vocab["pad"]
    hf = folder / "hf"  # weights only: the GGUF gets the SentencePiece vocabulary, not a tokenizer.json
    torch.manual_seed(0)
    model = model_cls(config).float().eval()
    randomize(model, 0)
    model.save_pretrained(hf)
    written = {"tokens": vocab["tokens"], "scores": vocab["scores"], "types": vocab["types"], "unk": vocab["unk"],
               "add_space_prefix": arch != "gemma2", **(spm or {})}  # the prefix flag as llama.cpp writes it
    extra = {**extra, "spm": written, **({} if add_bos is None else {"add_bos": add_bos})}
    return convert(hf, folder / f"{arch}.gguf", arch, config, extra)


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def gguf_file(request, tmp_path_factory):
    return spm_gguf(tmp_path_factory.mktemp(request.param), request.param)


def test_same_ids_and_text_as_transformers_gguf_tokenizer(gguf_file) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(gguf_file))  # transformers reads the file
    ref, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    ours = load_tokenizer(str(gguf_file))[0]
    assert ours.vocab_size == ref.get_vocab_size() == len(tokenizer_dict["tokens"])
    bos = ref.token_to_id(tokenizer_config["bos_token"])
    assert tokenizer_config["add_bos_token"] and ours.token_to_id(tokenizer_config["bos_token"]) == bos
    for text in TEXTS:
        want = ref.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == want, (text, ours.encode(text), want)
        assert ours.encode_prompt(text) == [bos, *want]  # add_bos_token absent: a SentencePiece file adds BOS
        for skip in (True, False):
            assert ours.decode(want, skip_special_tokens=skip) == ref.decode(want, skip_special_tokens=skip)
        if arch == "gemma2" or not text.startswith(" "):  # Llama's decoder drops the prefix space it adds
            assert ours.decode(want, skip_special_tokens=False) == text


def test_the_pieces_are_sentencepiece_s(gguf_file) -> None:
    tok = load_tokenizer(str(gguf_file))[0]
    gemma = "gemma2" in gguf_file.name
    ids = tok.encode("The capital of France is")
    assert [tok.id_to_token(i) for i in ids][1:] == ["▁capital", "▁of", "▁France", "▁is"]
    assert tok.id_to_token(ids[0]) == ("The" if gemma else "▁The")  # Gemma: no prefix space
    assert [tok.id_to_token(i) for i in tok.encode("é")] == (["<0xC3>", "<0xA9>"] if gemma else
                                                             ["▁", "<0xC3>", "<0xA9>"])  # byte fallback
    assert tok.encode("<start_of_turn>") == [tok.token_to_id("<start_of_turn>")]
    assert tok.decode(tok.encode("<start_of_turn>x<end_of_turn>")) == "x"  # control tokens: skipped
    assert tok.decode(tok.encode("<think>x")) == "<think>x"  # user-defined: matched whole, kept
    assert len(tok.encode("<think>")) == 1
    contested = [tok.id_to_token(i) for i in tok.encode("bdy uvwx gkm")]
    assert contested == (["bd", "y", "▁", "uv", "wx", "▁", "gk", "m"] if gemma else  # Gemma: the file's order
                         ["▁", "b", "dy", "▁", "uvw", "x", "▁", "gk", "m"])  # by score, then length, then order
    if gemma:  # the file spells its two-space token with real spaces: it is looked up as "▁▁"
        two = spm_vocab(gemma=True)["tokens"].index("  ")
        assert tok.encode("a  \n") == [tok.token_to_id("a"), two, tok.token_to_id("\n")]
        assert tok.id_to_token(two) == "▁▁"


def test_engine_and_router_tokenizers_agree(gguf_file) -> None:
    engine_side = Tokenizer.from_checkpoint(load_checkpoint(str(gguf_file)))
    router_side = load_tokenizer(str(gguf_file))[0]
    for text in TEXTS:
        ids = router_side.encode(text)
        assert engine_side.encode(text) == ids
        assert engine_side.encode_prompt(text) == router_side.encode_prompt(text)
        assert engine_side.decode(ids) == router_side.decode(ids)
    assert engine_side.vocab_size == router_side.vocab_size
    assert (engine_side.bos_token, engine_side.eos_token_ids) == (router_side.bos_token, router_side.eos_token_ids)


@pytest.mark.parametrize("add_bos", [False, True])
def test_add_bos_token_from_the_file(tmp_path, add_bos) -> None:
    path = spm_gguf(tmp_path, "llama", add_bos=add_bos)
    for tok in (load_tokenizer(str(path))[0], Tokenizer.from_checkpoint(load_checkpoint(str(path)))):
        plain = tok.encode("The capital")
        assert tok.encode_prompt("The capital") == ([spm_vocab()["bos"], *plain] if add_bos else plain)


def test_space_prefix_follows_the_file(tmp_path) -> None:
    meta = gguf_metadata(spm_vocab())
    on = spm_tokenizer(lambda k, d=None: {**meta, "tokenizer.ggml.add_space_prefix": True}.get(k, d), "llama")
    off = spm_tokenizer(lambda k, d=None: {**meta, "tokenizer.ggml.add_space_prefix": False}.get(k, d), "llama")
    assert on.encode("The", add_special_tokens=False).tokens == ["▁The"]
    assert off.encode("The", add_special_tokens=False).tokens == ["The"]
    assert off.decode(off.encode(" The").ids) == " The"


def test_a_vocabulary_without_scores_or_merges_is_refused() -> None:
    meta = gguf_metadata(spm_vocab())
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.scores"):
        spm_tokenizer(lambda k, d=None: meta.get(k, d), "llama")
    meta = gguf_metadata(spm_vocab())
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:-1]
    with pytest.raises(ModelLoadError, match="token_type has"):
        spm_tokenizer(lambda k, d=None: meta.get(k, d), "llama")


def test_an_unknown_tokenizer_model_is_refused_by_name(tmp_path) -> None:
    path = spm_gguf(tmp_path, "llama", {"model": "t5"})
    for load in (load_checkpoint, load_tokenizer):
        with pytest.raises(ModelLoadError, match=r"tokenizer model 't5' is not supported.*'gpt2'.*'llama'"):
            load(str(path))


def test_pdbox_generate_runs_a_gemma2_gguf_with_a_sentencepiece_vocabulary(tmp_path) -> None:
    from click.testing import CliRunner

    from appliance.cli import main
    from appliance.config import EngineConfig
    from appliance.engine.request import SamplingParams
    from appliance.llm import LLM

    path = spm_gguf(tmp_path, "gemma2")
    prompt = "The capital of France is"
    result = CliRunner().invoke(main, ["generate", prompt, "--model", str(path), "--max-tokens", "6", "--raw",
                                       "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    llm = LLM(str(path), EngineConfig(dtype="float32"))
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
        want = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0].text
    finally:
        llm.close()
    assert len(out.token_ids) == 6
    assert want and want in result.output, (want, result.output)
