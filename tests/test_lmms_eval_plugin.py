"""The lmms-eval model ``piofvlm``: registration, typed model args, every adapted family, batch > 1 = batch 1.

These tests need the lmms-eval package (``make install-eval``) and are skipped without it; the end-to-end runs
through lmms-eval's CLI are in ``test_lmms_eval_e2e.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import entry_points
from typing import Any

import pytest
import torch

from piofvlm.tiny import llava as toy
from piofvlm.tiny import qwen as toy_qwen


def test_importing_piofvlm_does_not_import_lmms_eval():
    code = (
        "import sys, piofvlm, piofvlm.integrations; print(json.dumps(sorted(m for m in sys.modules if 'lmms' in m)))"
    )
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


@pytest.fixture(scope="module")
def plugin():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make install-eval)")
    from piofvlm.integrations import lmms_eval as plugin

    return plugin


def test_entry_point_registers_the_chat_model(plugin):
    (ep,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "piofvlm"]
    assert ep.value == "piofvlm.integrations:lmms_eval_manifest"
    from lmms_eval.models import get_model

    assert get_model("piofvlm") is plugin.PiofvlmModel
    assert plugin.PiofvlmModel.is_simple is False


def test_model_args_are_typed_after_the_method_fields(plugin):
    from lmms_eval.utils import simple_parse_args_string

    def build(arg_string: str) -> dict[str, Any]:
        args = simple_parse_args_string(arg_string)  # lmms-eval's own --model_args parser
        return plugin.method_from_model_args(args.pop("method"), args).to_dict()

    pio = build("method=pio,keep=0.111,layers=2,tau=1,nms=false")
    assert pio["keep"] == [0.111] and pio["layers"] == [2] and pio["nms"] is False
    assert pio["tau"] == 1.0 and isinstance(pio["tau"], float)
    two_stage = build("method=pdrop,layers=[2,6],keep=[0.5,0.25]")
    assert two_stage["layers"] == [2, 6] and two_stage["keep"] == [0.5, 0.25]
    assert build("method=fastv,keep=64,query=mean")["keep"] == [64]
    assert build("method=vscan,global_layer=none,keep=0.25")["global_layer"] is None
    assert build("method=none") == {"method": "none"}


@pytest.mark.parametrize(
    ("arg_string", "message"),
    [
        ("method=nope", "unknown method 'nope'; available methods: cdpruner, "),
        ("method=pio,kep=0.1", "unknown model_args 'kep' for method 'pio': its fields are budget_scope, "),
        ("method=pio,nms=3", "model_arg nms=3 for method 'pio': expected bool, got int"),
        ("method=random,seed=0.5", "model_arg seed=0.5 for method 'random': expected int, got float"),
        ("method=pio,keep=abc", "model_arg keep='abc' for method 'pio': expected list[float | int] | float | int"),
        ("method=pio,layers=[2,", "cannot parse '[2,' as a list"),
        ("method=pio,keep=1.5", "keep"),  # the method's own validation
    ],
)
def test_bad_model_args_fail_before_loading(plugin, arg_string, message):
    with pytest.raises(ValueError, match=None) as info:
        plugin.PiofvlmModel.create_from_arg_string(f"pretrained=/nonexistent,{arg_string}", {"batch_size": 2})
    assert message in str(info.value)


def test_unsupported_model_type_is_refused_by_name(plugin, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    from piofvlm.adapters import ADAPTERS

    message = re.escape(f"model_type 'gpt2' is not supported by piofvlm; supported: {', '.join(sorted(ADAPTERS))}")
    with pytest.raises(ValueError, match=message):
        plugin.PiofvlmModel(pretrained=str(tmp_path), method="none")


# ------------------------------------------------------------------------------------------- every family
QUESTIONS = ["what is the colour of the circle ?", "how many ?", "count the small objects in the image ."]
SIZES = [(28, 28), (40, 60), (56, 30)]
# Qwen's own chat template writes <|vision_start|><|image_pad|><|vision_end|> for each image.
QWEN_TEMPLATE = (
    "{% for m in messages %}USER : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    + toy_qwen.IMAGE
    + " {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}ASSISTANT :"
)


def toy_family(kind: str) -> tuple[torch.nn.Module, Any]:
    if kind in ("llava", "llava_next"):
        model = toy.build_llava() if kind == "llava" else toy.build_llava_next()
        return model, toy.build_processor(kind)  # no chat template: the plugin's LLaVA-1.5 fallback
    if kind == toy_qwen.ONEVISION:
        processor = toy_qwen.build_onevision_processor()
        processor.chat_template = QWEN_TEMPLATE.replace(toy_qwen.IMAGE, toy_qwen.OV_IMAGE)
        return toy_qwen.build_onevision(), processor
    processor = toy_qwen.build_qwen_processor(kind)
    processor.chat_template = QWEN_TEMPLATE
    return toy_qwen.build_qwen(kind), processor


def make_model(plugin, kind: str, batch_size: int, **method_args: Any) -> Any:
    class ToyModel(plugin.PiofvlmModel):
        def load(self, pretrained, dtype, attn_implementation):  # the toy in memory instead of a directory
            model, processor = toy_family(kind)
            return model.to(dtype), processor

    return ToyModel(pretrained=kind, device="cpu", batch_size=batch_size, **method_args)


def requests_for(model: Any, n: int) -> list[Any]:
    from lmms_eval.api.instance import Instance

    docs = [{"image": toy.random_image(i, SIZES[i % 3]), "question": QUESTIONS[i % 3]} for i in range(n)]
    model.task_dict = {"toy": {"test": docs}}

    def doc_to_messages(doc: dict) -> list[dict]:
        return [
            {
                "role": "user",
                "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}],
            }
        ]

    gen_kwargs = {"max_new_tokens": 4, "temperature": 0, "until": ["\n\n"]}
    return [
        Instance(
            request_type="generate_until",
            arguments=("", doc_to_messages, dict(gen_kwargs), i, "toy", "test"),
            idx=0,
            metadata={"task": "toy", "doc_id": i, "repeats": 1},
        )
        for i in range(n)
    ]


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "kind",
    ["llava", *(pytest.param(k, marks=SLOW) for k in ("llava_next", *toy_qwen.QWEN_KINDS, toy_qwen.ONEVISION))],
)
def test_every_family_answers_with_batches_equal_to_batch_one(plugin, kind):
    def hooks(model: torch.nn.Module) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    one = make_model(plugin, kind, batch_size=1, method="pio", keep=0.3, layers=1)
    expected = [r.text for r in one.generate_until(requests_for(one, 5))]
    assert len(one.method.last_selection) == 1 and len(expected) == 5 and any(expected)
    unpruned = make_model(plugin, kind, batch_size=1, method="none")
    unpruned.generate_until(requests_for(unpruned, 1))
    assert hooks(one.model) == hooks(unpruned.model)  # only transformers' own hooks are left after the requests

    three = make_model(plugin, kind, batch_size=3, method="pio", keep=0.3, layers=1)
    assert [r.text for r in three.generate_until(requests_for(three, 5))] == expected


# ------------------------------------------------------------------------------- big models: device_map, tp_plan
@pytest.mark.parametrize(
    ("arg_string", "message"),
    [
        ("device_map=nowhere", "device_map='nowhere': expected one of auto, balanced, balanced_low_0, sequential"),
        ('device_map={"":"gpu7"}', "device_map['']: 'gpu7' is not a device"),
        ("device_map={bad", "cannot parse device_map='{bad' as a JSON object"),
        ("device_map=auto,device=cpu", "give device_map or device, not both"),
        ('max_memory={"cpu":"1GiB"}', "max_memory needs device_map"),
        ("offload_folder=/tmp/x", "offload_folder needs device_map"),
        ("device_map=auto,max_memory=1GiB", "max_memory='1GiB': expected a JSON object of device -> size"),
        ('device_map=auto,max_memory={"cpu":1.5}', "max_memory['cpu']=1.5: expected bytes (int) or a size"),
        ('device_map=auto,max_memory={"tpu9":"1GiB"}', "max_memory key 'tpu9': 'tpu9' is not a device"),
        ("tp_plan=colwise", "tp_plan='colwise': only tp_plan=auto"),
        ("tp_plan=auto", "tp_plan=auto shards the model over the ranks of torchrun: launch with torchrun"),
    ],
)
def test_bad_big_model_args_fail_before_loading(plugin, arg_string, message):
    with pytest.raises(ValueError) as info:
        plugin.PiofvlmModel.create_from_arg_string(f"pretrained=/nonexistent,method=none,{arg_string}", {})
    assert message in str(info.value)


def test_big_model_args_reach_from_pretrained_typed(plugin):
    from lmms_eval.utils import simple_parse_args_string

    args = simple_parse_args_string('device_map=auto,max_memory={"0":"20GiB","cpu":2000000},offload_folder=/tmp/o')
    kwargs = plugin.big_model_args(**args, tp_plan=None, device=None, world_size=1)
    assert kwargs == {"device_map": "auto", "max_memory": {0: "20GiB", "cpu": 2000000}, "offload_folder": "/tmp/o"}
    explicit = plugin.big_model_args('{"":"cpu"}', None, None, None, None, 1)
    assert explicit == {"device_map": {"": "cpu"}}
    assert plugin.big_model_args(0, None, None, None, None, 1) == {"device_map": 0}
    sharded = plugin.big_model_args(None, None, None, "auto", None, 2)
    assert list(sharded) == ["distributed_config"] and sharded["distributed_config"].tp_plan == "auto"
    with pytest.raises(ValueError, match="under 2 data-parallel processes would spread every process"):
        plugin.big_model_args("auto", None, None, None, None, 2)


def requests_on_testbed(model: Any, n: int) -> list[Any]:
    from lmms_eval.api.instance import Instance

    from piofvlm.testbed import data

    model.task_dict = {"tb": {"test": data.make_split("test", n)}}

    def doc_to_messages(doc: dict) -> list[dict]:
        content = [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}]
        return [{"role": "user", "content": content}]

    gen_kwargs = {"max_new_tokens": 3, "temperature": 0, "until": ["\n\n"]}
    return [
        Instance(
            request_type="generate_until",
            arguments=("", doc_to_messages, dict(gen_kwargs), i, "tb", "test"),
            idx=0,
            metadata={"task": "tb", "doc_id": i, "repeats": 1},
        )
        for i in range(n)
    ]


@SLOW
@pytest.mark.parametrize("method", ["pio", "fastv"])
def test_device_map_with_disk_offload_answers_as_the_model_in_memory(plugin, method, tmp_path):
    from piofvlm.testbed.model import CHECKPOINT_DIR

    if not (CHECKPOINT_DIR / "model.safetensors").is_file():
        pytest.skip(f"the shipped testbed checkpoint is missing ({CHECKPOINT_DIR})")
    args = f"pretrained={CHECKPOINT_DIR},method={method},keep=0.25,layers=2,batch_size=2"
    in_memory = plugin.PiofvlmModel.create_from_arg_string(args, {})
    expected = [r.text for r in in_memory.generate_until(requests_on_testbed(in_memory, 4))]
    offload = f'device_map=auto,max_memory={{"cpu":"5MB"}},offload_folder={tmp_path / "offload"}'
    offloaded = plugin.PiofvlmModel.create_from_arg_string(f"{args},{offload}", {})
    placed = set(offloaded.model.hf_device_map.values())
    assert placed == {"cpu", "disk"}, offloaded.model.hf_device_map  # some weights in memory, the rest on disk
    # disk-offloaded weights stay on the meta device between calls (read from the safetensors file when used)
    assert any(p.device.type == "meta" for p in offloaded.model.parameters())
    assert any(p.device.type == "cpu" for p in offloaded.model.parameters())
    assert [r.text for r in offloaded.generate_until(requests_on_testbed(offloaded, 4))] == expected
    assert len(expected) == 4 and all(expected)
