"""Every bad input gets a clear exception naming the field or file; other requests keep running."""

from __future__ import annotations

import pytest

from open_autoglm.errors import ModelLoadError, RequestError
from open_autoglm.llm import LLM
from open_autoglm.sampling_params import SamplingParams, SamplingParamsError


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(model=str(tiny_checkpoint("llama")), max_model_len=64)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-5), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logprobs=100), "logprobs"),
    (dict(stop=[""]), "stop"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field and field in str(err.value)


def test_empty_prompt(llm):
    for prompt in ("", []):
        with pytest.raises(RequestError) as err:
            llm.generate([prompt])
        assert err.value.field == "prompt"


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(RequestError, match="max_model_len is 64") as err:
        llm.generate([[10] * 80])
    assert err.value.field == "prompt"


def test_token_ids_outside_the_vocabulary(llm):
    with pytest.raises(RequestError, match=r"\[0, 320\)"):
        llm.generate([[5, 99999]])


def test_a_bad_prompt_in_a_batch_adds_none_of_it(llm):
    with pytest.raises(RequestError):
        llm.generate(["hello there", ""])
    assert not llm.engine.has_unfinished_requests()


def test_other_requests_keep_running(llm):
    engine = llm.engine
    good = engine.add_request("The quick brown fox", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    with pytest.raises(RequestError):
        engine.add_request("", SamplingParams())
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done[good].finish_reason == "length" and len(done[good].output_token_ids) == 8


def test_request_that_can_never_fit_the_cache(tiny_checkpoint):
    small = LLM(model=str(tiny_checkpoint("llama")), num_kv_blocks=2)  # 32 tokens in all
    with pytest.raises(RequestError, match="needs 3 KV blocks, but the cache holds 2") as err:
        small.generate(["hi"], SamplingParams(max_tokens=40))
    assert err.value.field == "max_tokens"
    assert small.generate(["hi"], SamplingParams(max_tokens=4))[0].output_token_ids  # still serves


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        LLM(model="no-such-model-xyz")


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelLoadError):
        LLM(model=str(tmp_path / "nowhere"))


def test_unsupported_architecture(tiny_checkpoint, tmp_path):
    import json
    import shutil

    folder = tmp_path / "weird"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="MambaForCausalLM.*supported: LlamaForCausalLM, Qwen2ForCausalLM, Glm4ForCausalLM"):
        LLM(model=str(folder))


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "cut"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(model=str(folder))


def test_missing_and_unexpected_keys_are_listed(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "keys"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.extra.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing keys model\.norm\.weight; unexpected keys model\.extra\.weight"):
        LLM(model=str(folder))
