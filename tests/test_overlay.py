"""Token boxes (where each visual token lies on its image) for every family, and the overlays drawn from them."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from piofvlm import cli
from piofvlm.adapters import ModelAdapter, get_adapter
from piofvlm.adapters.boxes import TokenBoxes, closest_grid, raster_boxes, split_by_sample
from piofvlm.core.context import StageRecord
from piofvlm.doctor import ReplaySelection
from piofvlm.overlay import DIM, draw_overlay, item_panels, overlay_legend, processor_view, stage_panel
from piofvlm.tiny import families as toy_families
from piofvlm.tiny import llava as toy
from piofvlm.tiny import qwen as toy_qwen
from piofvlm.tiny.cases import TINY_CASES
from piofvlm.tiny.pictures import source_sizes, tiny_pictures


@functools.cache
def case(kind: str):
    model, inputs = TINY_CASES[kind]()
    return model, inputs, tiny_pictures(kind)


def expected_item_counts(kind: str, adapter: ModelAdapter, inputs: dict) -> list[int]:
    """The adapter's per-item counts (flat prompt order); InternVL / SmolVLM items are runs: the family's table."""
    visual = adapter.visual_slots(inputs)
    counts = adapter.image_token_counts(int(visual.sum()), inputs)
    if counts is None:
        counts = [count for sample in toy_families.FAMILIES[kind].counts[:2] for count in sample]
    return counts


def intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N, M)`` intersection areas of boxes ``a`` ``(N, 4)`` and ``b`` ``(M, 4)``."""
    width = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    height = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    return width * height


def check_tiles_picture(boxes: torch.Tensor) -> None:
    """``boxes`` ``(N, 4)`` lie in [0, 1], do not overlap, and cover the unit square."""
    assert bool((boxes >= 0).all() and (boxes <= 1).all())
    assert bool((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all())
    overlap = intersection(boxes, boxes).double()
    overlap.fill_diagonal_(0)
    assert float(overlap.max()) < 1e-9, "two tokens of one view overlap"
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).double()
    assert float(areas.sum()) == pytest.approx(1.0, abs=1e-6), "a view's tokens do not cover the picture"


@pytest.mark.parametrize("kind", sorted(TINY_CASES))
def test_boxes_count_every_visual_token_and_tile_each_view(kind):
    model, inputs, pictures = case(kind)
    adapter = get_adapter(model)
    items = adapter.token_boxes(inputs, source_sizes=source_sizes(pictures))
    assert len(items) == len(pictures)
    # Each item is a whole number of the adapter's items (SmolVLM's items are tiles), in order, with nothing left.
    counts = expected_item_counts(kind, adapter, inputs)
    ends = set(np.cumsum(counts).tolist())
    lengths = [len(item.tokens) for item in items]
    assert set(np.cumsum(lengths).tolist()) <= ends and sum(lengths) == sum(counts)
    if kind not in ("smolvlm", "idefics3"):
        assert lengths == counts
    visual = adapter.visual_slots(inputs)
    for b in range(visual.shape[0]):
        tokens = torch.cat([item.tokens for item in items if item.sample == b])
        assert torch.equal(tokens, torch.arange(int(visual[b].sum())))  # each visual token once, in prompt order
    for item in items:
        n = len(item.tokens)
        assert item.boxes.shape == (n, 4) and item.view.shape == (n,)
        unplaced = item.view < 0
        assert bool(torch.isnan(item.boxes[unplaced]).all()) and not bool(torch.isnan(item.boxes[~unplaced]).any())
        assert set(item.view[~unplaced].tolist()) == set(range(len(item.views)))
        for view in range(len(item.views)):
            check_tiles_picture(item.boxes[item.view == view])
        if item.modality == "video":
            assert item.views == tuple(f"frame {t + 1}" for t in range(len(item.views)))


def test_qwen_non_square_grid_exact_boxes():
    """The video of the Qwen2-VL case is 2 x 4 x 6 patches: two frames of a 2 x 3 merged grid."""
    model, inputs, pictures = case("qwen2_vl")
    video = get_adapter(model).token_boxes(inputs, source_sizes(pictures))[2]
    assert video.modality == "video" and video.views == ("frame 1", "frame 2")
    third, half = 1 / 3, 1 / 2
    frame = [
        [0, 0, third, half],
        [third, 0, 2 * third, half],
        [2 * third, 0, 1, half],
        [0, half, third, 1],
        [third, half, 2 * third, 1],
        [2 * third, half, 1, 1],
    ]
    assert torch.allclose(video.boxes, torch.tensor(frame * 2))
    assert video.view.tolist() == [0] * 6 + [1] * 6


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "glm4v", "glm4v-videos"])
def test_qwen_boxes_follow_the_models_rope_grid(kind):
    """Independent check: the model's own 3-D RoPE positions place each visual token at (frame, row, col)."""
    if kind == "glm4v-videos":  # video-only prompts, frames split by text, told apart by mm_token_type_ids
        model, inputs = case("glm4v")[0], toy_families.glm4v_video_inputs()
        pictures = [
            [toy.random_image(t, (w * 14, h * 14)) for t in range(2 * f)] for f, h, w in toy_families.GLM_VIDEOS
        ]
    else:
        model, inputs, pictures = case(kind)
    adapter = get_adapter(model)
    kwargs = {key: inputs.get(key) for key in ("image_grid_thw", "video_grid_thw", "attention_mask")}
    positions, _ = adapter.multimodal_model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], **kwargs)
    visual = adapter.visual_slots(inputs)
    for item in adapter.token_boxes(inputs, source_sizes(pictures)):
        slots = visual[item.sample].nonzero()[:, 0][item.tokens]
        t, h, w = (positions[axis, item.sample, slots] for axis in range(3))
        frame = torch.unique(t, return_inverse=True)[1]  # GLM starts each frame's grid anew: rows/cols per frame
        expected = torch.empty(len(slots), 4)
        for f in frame.unique():
            mine = frame == f
            row, col = h[mine] - h[mine].min(), w[mine] - w[mine].min()
            rows, cols = int(row.max()) + 1, int(col.max()) + 1
            expected[mine] = torch.stack([col / cols, row / rows, (col + 1) / cols, (row + 1) / rows], dim=-1).float()
        assert torch.allclose(item.boxes, expected) and torch.equal(item.view, frame)


def test_llava_next_tile_maps_to_its_quadrant():
    """A square 56 px image takes the 2 x 2 pinpoint: no unpadding; the model's own packing says which tile (crop)
    each token comes from, and tile q's tokens are exactly quadrant q of the high-resolution view."""
    model = toy.build_llava_next(num_layers=1)
    inputs = toy.build_processor("llava_next")(
        images=[toy.random_image(3, (56, 56))], text=["USER : <image> how many ? ASSISTANT :"], return_tensors="pt"
    )
    adapter = get_adapter(model)
    (item,) = adapter.token_boxes(inputs, [(56, 56)])
    (source,) = adapter.visual_token_sources(inputs)
    assert item.views == ("base", "high-res")
    for quadrant in range(4):
        mine = item.boxes[source["crop"] == quadrant + 1]
        assert len(mine) == 49 and bool((item.view[source["crop"] == quadrant + 1] == 1).all())
        x0, y0 = (quadrant % 2) / 2, (quadrant // 2) / 2
        assert bool((mine[:, 0] >= x0).all() and (mine[:, 2] <= x0 + 0.5).all())
        assert bool((mine[:, 1] >= y0).all() and (mine[:, 3] <= y0 + 0.5).all())
        assert float(((mine[:, 2] - mine[:, 0]) * (mine[:, 3] - mine[:, 1])).sum()) == pytest.approx(0.25)
    assert bool(torch.isnan(item.boxes[source["crop"] < 0]).all())  # 14 newlines: placeholders with no place
    assert int((source["crop"] < 0).sum()) == 14


def test_internvl_and_smolvlm_tiles_are_halves_of_a_wide_image():
    """A 64 x 32 picture: InternVL cuts 2 x 1 tiles (+ thumbnail), SmolVLM 1 row of 2 tiles (+ global view)."""
    for kind, index, tile_tokens in (("internvl", 1, 16), ("smolvlm", 1, 16)):
        if kind not in TINY_CASES:  # SmolVLM's PIL processor needs torchvision on the 5.17 floor
            continue
        model, inputs, pictures = case(kind)
        item = get_adapter(model).token_boxes(inputs, source_sizes(pictures))[index]
        assert pictures[index].size == (64, 32) and item.views[1] in ("thumbnail", "global")
        left, right = item.boxes[:tile_tokens], item.boxes[tile_tokens : 2 * tile_tokens]
        half = raster_boxes(4, 4) * torch.tensor([0.5, 1.0, 0.5, 1.0])  # a 4 x 4 tile over half the width
        assert torch.allclose(left, half)
        assert torch.allclose(right, half + torch.tensor([0.5, 0.0, 0.5, 0.0]))
        assert torch.allclose(item.boxes[2 * tile_tokens :], raster_boxes(4, 4))  # the whole picture
    with pytest.raises(ValueError, match="pass source_sizes"):
        get_adapter(case("internvl")[0]).token_boxes(case("internvl")[1])


def test_mistral3_rows_without_breaks():
    model, inputs, pictures = case("mistral3")
    item = get_adapter(model).token_boxes(inputs, source_sizes(pictures))[1]  # 64 x 32 px: 4 rows of 8 [IMG]
    assert len(item.tokens) == 32
    assert torch.allclose(item.boxes[9], torch.tensor([1 / 8, 1 / 4, 2 / 8, 2 / 4]))


def test_grid_helpers():
    assert closest_grid(2, 64, 32) == (1, 2) and closest_grid(2, 32, 64) == (2, 1)
    assert closest_grid(4, 40, 60) == (2, 2) and closest_grid(6, 400, 100) == (1, 6)
    visual = torch.tensor([[False, True, True, True], [True, True, False, False]])
    placed = split_by_sample(visual, [1, 2, 2])
    assert [(b, t.tolist()) for b, t in placed] == [(0, [0]), (0, [1, 2]), (1, [0, 1])]
    with pytest.raises(ValueError, match="do not match"):
        split_by_sample(visual, [2, 2, 2])


def test_a_family_without_boxes_says_so():
    class Unknown(ModelAdapter):
        model_types = ("gemma3",)

    adapter = Unknown(toy.build_llava(num_layers=1))
    with pytest.raises(ValueError, match="overlays are not available for gemma3"):
        adapter.token_boxes({})


# --------------------------------------------------------------------------------------------------- drawing
def gradient(width: int, height: int) -> Image.Image:
    """A picture whose every pixel differs from its neighbours' (so a misplaced box shows)."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([(x * 7 + 30) % 256, (y * 11 + 60) % 256, (x * 3 + y * 5 + 90) % 256], axis=-1)
    return Image.fromarray(array.astype(np.uint8))


def test_stage_panel_shows_kept_pixels_and_dims_dropped():
    base = gradient(64, 32)
    boxes = raster_boxes(4, 8)  # 8 x 8 px cells
    kept = torch.zeros(32, dtype=torch.bool)
    kept[[0, 9, 31]] = True
    panel = np.asarray(stage_panel(base, boxes, kept)).astype(int)
    source = np.asarray(base).astype(int)
    for token in range(32):
        row, col = divmod(token, 8)
        inner = (slice(8 * row + 1, 8 * row + 7), slice(8 * col + 1, 8 * col + 7))  # inside the outline
        if kept[token]:
            assert (panel[inner] == source[inner]).all()
        else:
            assert (np.abs(panel[inner] - source[inner] * (1 - DIM)) <= 1).all()


def test_item_panels_draw_kept_tokens_on_the_right_cells():
    """A Qwen2-VL image of 168 x 84 px is a 3 x 6 grid (28 px cells); replaying a selection, the stage panel (drawn
    at the picture's own size) shows exactly the kept cells' pixels."""
    model = toy_qwen.build_qwen("qwen2_vl", num_layers=2)
    picture = gradient(168, 84)
    inputs = toy_qwen.build_qwen_processor("qwen2_vl")(
        images=[picture], text=[f"USER : {toy_qwen.IMAGE} how many ? ASSISTANT :"], return_tensors="pt"
    )
    chosen = [0, 7, 17]
    method = ReplaySelection(layers=[1], keep=3, chosen=[[chosen]])
    with torch.no_grad(), method(model):
        model(**inputs)
    (item,) = get_adapter(model).token_boxes(inputs, [picture.size])
    assert len(item.tokens) == 18
    panels = item_panels(item, [picture], method.last_selection, (), panel_height=84)
    assert [caption for _, caption in panels] == ["original", "stage 1, image: 3/18"]
    panel, source = np.asarray(panels[1][0]).astype(int), np.asarray(picture).astype(int)
    for token in range(18):
        row, col = divmod(token, 6)
        inner = (slice(28 * row + 1, 28 * row + 27), slice(28 * col + 1, 28 * col + 27))
        if token in chosen:
            assert (panel[inner] == source[inner]).all()
        else:
            assert (panel[inner] < source[inner] * (1 - DIM) + 1.01).all()


@pytest.mark.parametrize("kind", [k for k in ("llava_onevision", "smolvlm") if k in TINY_CASES])
def test_draw_overlay_rows_views_frames_and_legend(kind):
    model, inputs, pictures = case(kind)
    chosen = [[[0, 1, 2], [0, 5, 40]], [[1], [5]]]
    method = ReplaySelection(layers=[0, 1], keep=[3, 1], budget_scope="sample", chosen=chosen)
    with torch.no_grad(), method(model):
        model(**inputs)
    canvas = draw_overlay(model, inputs, method.last_selection, pictures, method=method, max_frames=1)
    legend = canvas.info["legend"].splitlines()
    assert legend[0] == "method: replay  keep=[3, 1]  layers=[0, 1]  budget_scope=sample"
    totals = [int(get_adapter(model).visual_slots(inputs)[b].sum()) for b in (0, 1)]
    assert legend[1] == (
        f"stage 1 (after 0 decoder layers): sample 0: 3/{totals[0]} kept ({100 * 3 / totals[0]:.1f}%); "
        f"sample 1: 3/{totals[1]} kept ({100 * 3 / totals[1]:.1f}%)"
    )
    assert legend[2].startswith("stage 2 (after 1 decoder layers): sample 0: 1/")
    assert canvas.height > 3 * 160 and np.asarray(canvas)[:40].min() < 100  # three rows; the legend is drawn
    with pytest.raises(ValueError, match="2 pictures given"):
        draw_overlay(model, inputs, method.last_selection, pictures[:2])
    with pytest.raises(ValueError, match="the batch has samples 0 .. 1"):
        draw_overlay(model, inputs, method.last_selection, pictures, samples=[2])
    only = draw_overlay(model, inputs, method.last_selection, pictures, samples=[0], max_frames=1)
    assert "sample 1" not in only.info["legend"] and only.height < canvas.height  # one row of sample 0


def test_processor_view_is_the_center_crop_the_tower_sees():
    clip = toy.build_processor("llava").image_processor  # shortest edge 28, then a central 28 x 28 crop
    image = gradient(40, 60)
    assert np.array_equal(np.asarray(processor_view(image, clip)), np.asarray(image.crop((0, 10, 40, 50))))
    square = gradient(30, 30)
    assert processor_view(square, clip) is square  # nothing cropped: the picture itself (its marks still apply)
    assert processor_view(image, toy_qwen.build_qwen_processor("qwen2_vl").image_processor) is image


def test_overlay_legend_without_stages():
    item = TokenBoxes(0, "image", torch.arange(4), raster_boxes(2, 2), torch.zeros(4, dtype=torch.long), ("image",))
    assert overlay_legend([], "none", [item], [0]) == ["method: none", "no stage ran: every visual token kept"]
    record = StageRecord(stage=0, layer=2, kept=[torch.tensor([1])])
    assert (
        overlay_legend([record], None, [item], [0])[1]
        == "stage 1 (after 2 decoder layers): sample 0: 1/4 kept (25.0%)"
    )


# ------------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("kind", ["qwen2_vl", "internvl"])
def test_show_draws_a_tiny_family(kind, tmp_path, capsys):
    out = tmp_path / "overlay.png"
    assert cli.main(["show", "--family", kind, "--method", "random", "--keep", "0.5", "--out", str(out)]) == 0
    image = Image.open(out)
    legend = image.text["legend"].splitlines()
    assert legend[0] == cli.RANDOM_WEIGHTS_NOTE  # the picture says its model is untrained
    assert legend[1].startswith("method: random  keep=[0.5]  layers=[2]")
    assert legend[2].startswith("stage 1 (after 2 decoder layers): sample 0: ")
    assert "RANDOM weights" in capsys.readouterr().out


def test_show_refuses_a_family_without_boxes(tmp_path, capsys, monkeypatch):
    from piofvlm.adapters import llava

    def no_boxes(self, model_kwargs, source_sizes=None):
        return ModelAdapter.token_boxes(self, model_kwargs, source_sizes)

    monkeypatch.setattr(llava.LlavaAdapter, "token_boxes", no_boxes)
    assert cli.main(["show", "--family", "llava", "--out", str(tmp_path / "o.png")]) == 2
    assert "piofvlm: error: overlays are not available for llava models" in capsys.readouterr().err


def test_show_any_checkpoint_on_an_image(tmp_path, capsys):
    """``--model DIR --image FILE``: a saved checkpoint (tiny LLaVA) through from_pretrained; its CLIP processor
    center-crops a 40 x 60 picture, so the panels show the central 40 x 40 square."""
    toy.save_toy_llava(tmp_path / "model")
    gradient(40, 60).save(tmp_path / "image.png")
    out = tmp_path / "overlay.png"
    argv = ["show", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "image.png"), "--out", str(out)]
    assert cli.main([*argv, "--method", "random", "--keep", "0.25", "--layers", "1"]) == 0
    assert (
        Image.open(out).text["legend"].splitlines()[1]
        == "stage 1 (after 1 decoder layers): sample 0: 12/49 kept (24.5%)"
    )
    assert cli.main(["show", "--image", str(tmp_path / "image.png"), "--out", str(out)]) == 2
    assert "piofvlm: error: --image needs --model" in capsys.readouterr().err


def test_show_unknown_family(tmp_path, capsys):
    assert cli.main(["show", "--family", "gemma2", "--out", str(tmp_path / "o.png")]) == 2
    assert "piofvlm: error: no tiny model of family 'gemma2'" in capsys.readouterr().err
