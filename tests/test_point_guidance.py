"""Projected point-prompt guidance: what a frame shows of each query point reaches that point's slot."""
from __future__ import annotations

import pytest
import torch

from engine.head import load_head
from engine.model import TINY, build_model
from engine.model.point_guidance import N_POINT_FEATURES, projected_point_features
from engine.prompt_views import point_features, posed_prompts
from engine.prompts import build_point_prompts
from engine.types import Cameras, FlameParams, intrinsics_from_fov, look_at

SIDE = 64


def _camera(eye: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    view = look_at(torch.tensor(eye), torch.tensor([0.0, 0.0, 0.0]))
    return view[None], intrinsics_from_fov(30.0, SIDE, SIDE)[None]


def test_a_point_picks_up_the_colour_under_its_projection_and_knows_whether_it_faces_the_camera() -> None:
    view, K = _camera([0.0, 0.0, 1.0])                       # camera on +z looking at the origin
    image = torch.zeros(1, 3, SIDE, SIDE)
    image[0, 0, :, SIDE // 2:] = 1.0                         # right half red (camera x points to world -x here)
    image[0, 2, :, :SIDE // 2] = 1.0                         # left half blue
    means = torch.tensor([[[-0.05, 0.0, 0.0], [0.05, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])
    normals = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]])
    f = projected_point_features(image, means, normals, view, K)
    assert f.shape == (1, 4, N_POINT_FEATURES)
    rgb, seen_rgb, uv = f[0, :, 0:3], f[0, :, 3:6], f[0, :, 6:8]
    facing, inside = f[0, :, -3], f[0, :, -2]
    right = int(torch.argmax(uv[:2, 0]))                     # the one of the first two that lands right
    assert rgb[right].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-5)
    assert rgb[1 - right].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-5)
    assert facing[0] > 0.99 and facing[2] < -0.99             # towards / away from the camera
    assert seen_rgb[2].abs().max() == 0                      # a back-facing point contributes no seen colour
    assert inside[:3].tolist() == [1.0, 1.0, 1.0] and inside[3] == 0.0   # 3 m aside is outside the image
    assert rgb[3].abs().max() == 0


def test_posed_prompt_normals_turn_with_the_head() -> None:
    head = load_head()
    prompts = build_point_prompts(head, levels=0)
    params = FlameParams.zeros(2, int(head.n_shape), int(head.n_expression))
    params.rotation[1, 1] = torch.pi / 2                     # head turned 90 degrees about y
    means, normals = posed_prompts(prompts, head, params)
    nose = int(torch.argmax(means[0, :, 2]))                 # front-most point at rest faces +z
    assert normals[0, nose, 2] > 0.8
    assert normals[1, nose, 0] > 0.8                         # after the turn it faces +x
    assert torch.allclose(normals.norm(dim=-1), torch.ones(2, len(prompts)), atol=1e-5)


def test_frames_facing_the_head_see_the_front_and_a_frame_behind_sees_the_back() -> None:
    head = load_head()
    prompts = build_point_prompts(head, levels=0)
    params = FlameParams.zeros(2, int(head.n_shape), int(head.n_expression))
    v1, k1 = _camera([0.0, 0.0, 0.8])
    v2, k2 = _camera([0.0, 0.0, -0.8])
    cams = Cameras(torch.cat([v1, v2]), torch.cat([k1, k2]), SIDE, SIDE)
    f = point_features(prompts, head, params, cams, torch.rand(2, 3, SIDE, SIDE))
    front = prompts.v_template[:, 2] > prompts.v_template[:, 2].median()
    facing = f[..., -3]
    assert facing[0, front].mean() > 0.3 and facing[1, front].mean() < -0.3
    # the same cameras at twice the image size: features describe the same geometry
    f2 = point_features(prompts, head, params, Cameras(cams.viewmats, cams.Ks, SIDE, SIDE),
                        torch.rand(2, 3, 2 * SIDE, 2 * SIDE))
    torch.testing.assert_close(f2[..., 6:8], f[..., 6:8], atol=1e-5, rtol=0)


def test_the_network_needs_the_features_and_starts_out_as_the_model_without_them_plus_the_colour_skip() -> None:
    from engine.model.point_guidance import colour_prior_logits

    torch.manual_seed(0)
    guided = build_model(TINY).eval()
    plain = build_model(TINY.replace(name="tiny-plain", point_guidance=False)).eval()
    missing = plain.load_state_dict(guided.state_dict(), strict=False)
    assert missing.missing_keys == [] and all(k.startswith("point_guidance.") for k in missing.unexpected_keys)
    frames = torch.rand(1, 3, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(1))
    points = torch.randn(40, 3, generator=torch.Generator().manual_seed(2)) * 0.08
    feats = torch.rand(1, 3, 40, N_POINT_FEATURES, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        with pytest.raises(ValueError, match="point guidance"):
            guided(frames, points)
        fresh, ref = guided(frames, points, point_features=feats), plain(frames, points)
        # zero-initialised embedding: the same Gaussians, colours shifted by the skip in base slots only
        for name in ("xyz", "scale", "opacity", "rotation", "importance"):
            torch.testing.assert_close(getattr(fresh, name), getattr(ref, name))
        shift = torch.logit(fresh.rgb) - torch.logit(ref.rgb)
        torch.testing.assert_close(shift[:, :3], colour_prior_logits(feats), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(shift[:, 3], torch.zeros_like(shift[:, 3]), atol=1e-4, rtol=0)
        torch.nn.init.normal_(guided.point_guidance.mlp[2].weight, std=0.1)
        a = guided(frames, points, point_features=feats)
        b = guided(frames, points, point_features=feats.flip(1))      # frame 0 gets frame 2's features
    assert (a.rgb[:, 0] - b.rgb[:, 0]).abs().max() > 1e-4


def test_the_colour_skip_starts_from_what_the_frame_shows_and_grey_where_it_does_not_look():
    from engine.model.point_guidance import FACING, INSIDE, colour_prior_logits

    f = torch.zeros(4, N_POINT_FEATURES)
    f[:, 0:3] = torch.tensor([0.9, 0.2, 0.1])
    f[:, FACING] = torch.tensor([0.9, 0.2, -0.5, 0.9])
    f[:, INSIDE] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    rgb = torch.sigmoid(colour_prior_logits(f))
    torch.testing.assert_close(rgb[0], torch.tensor([0.9, 0.2, 0.1]))            # faced: the sampled colour
    torch.testing.assert_close(rgb[1], 0.6 * torch.tensor([0.9, 0.2, 0.1]) + 0.4 * 0.5)   # slanted: part way
    torch.testing.assert_close(rgb[2], torch.full((3,), 0.5))                     # from behind: grey
    torch.testing.assert_close(rgb[3], torch.full((3,), 0.5))                     # outside the image: grey
