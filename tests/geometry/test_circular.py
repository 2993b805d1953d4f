"""Geometry contract: rays, pixel centres, projection matrices, affine, JSON, validation."""

import math

import pytest
import torch

from medgauss.geometry import ConeBeamGeometry, ParallelBeamGeometry, geometry_from_json

COMMON = dict(
    det_shape=(6, 8),
    det_spacing=(1.1, 1.3),
    vol_shape=(5, 7, 9),
    vol_spacing=(1.0, 2.0, 1.5),
    angles=[0.0, 0.7, 2.0, 4.5],
    det_offset=(0.4, -0.6),
    vol_offset=(1.0, -2.0, 3.0),
)


def cone(**kw):
    args = dict(dso=500.0, dsd=800.0, **COMMON)
    args.update(kw)
    return ConeBeamGeometry(**args)


def parallel(**kw):
    args = dict(COMMON)
    args.update(kw)
    return ParallelBeamGeometry(**args)


def homogeneous_project(matrices, points):
    h = torch.einsum("vij,v...j->v...i", matrices, torch.cat((points, torch.ones_like(points[..., :1])), -1))
    return h[..., 0] / h[..., 2], h[..., 1] / h[..., 2]


@pytest.mark.parametrize("make", [cone, parallel])
@pytest.mark.parametrize("downsample", [1, 2])
def test_projection_matrices_map_ray_points_to_their_pixel(make, downsample):
    geo = make()
    origins, dirs = geo.rays(downsample=downsample, dtype=torch.float64)
    _, rows, cols = geo.output_shape(downsample)
    P = geo.projection_matrices(downsample)
    for t in (120.0, 500.0, 650.0):
        col, row = homogeneous_project(P, origins + t * dirs)
        torch.testing.assert_close(col, torch.arange(cols, dtype=torch.float64).expand_as(col))
        torch.testing.assert_close(row, torch.arange(rows, dtype=torch.float64)[:, None].expand_as(row))


def test_cone_rays_follow_the_contract():
    geo = cone()
    o, d = geo.rays(dtype=torch.float64)
    assert o.shape == d.shape == (4, 6, 8, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(4, 6, 8, dtype=torch.float64))
    theta = 0.7
    e_s = torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64)
    u = torch.tensor([-math.sin(theta), math.cos(theta), 0.0], dtype=torch.float64)
    v = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(o[1, 2, 3], 500.0 * e_s)
    r, c = 2, 5  # pixel centre written out from the contract formula
    pix = -(800.0 - 500.0) * e_s + (c - 3.5) * 1.3 * u + (r - 2.5) * 1.1 * v + (-0.6) * u + 0.4 * v
    torch.testing.assert_close(d[1, r, c], (pix - 500.0 * e_s) / (pix - 500.0 * e_s).norm())
    torch.testing.assert_close(geo.pixel_centers()[1, r, c], pix)


def test_parallel_rays_follow_the_contract():
    geo = parallel()
    o, d = geo.rays(dtype=torch.float64)
    theta = 2.0
    e_s = torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64)
    torch.testing.assert_close(d[2], (-e_s).expand(6, 8, 3))
    u = torch.tensor([-math.sin(theta), math.cos(theta), 0.0], dtype=torch.float64)
    pix = (
        (7 - 3.5) * 1.3 * u
        + (0 - 2.5) * 1.1 * torch.tensor([0, 0, -1.0], dtype=torch.float64)
        + (-0.6) * u
        + torch.tensor([0, 0, -0.4], dtype=torch.float64)
    )
    torch.testing.assert_close(o[2, 0, 7], pix)
    assert geo.projection_matrices()[:, 2].tolist() == [[0.0, 0.0, 0.0, 1.0]] * 4


def test_downsample_keeps_the_detector_centre():
    geo = cone(det_shape=(8, 8))
    full = geo.pixel_centers().mean(dim=(1, 2))
    half = geo.pixel_centers(downsample=2)
    assert half.shape == (4, 4, 4, 3)
    torch.testing.assert_close(half.mean(dim=(1, 2)), full)
    step = geo.pixel_centers()[:, 0, 1] - geo.pixel_centers()[:, 0, 0]
    torch.testing.assert_close(half[:, 0, 1] - half[:, 0, 0], 2 * step)


def test_volume_affine_matches_the_contract():
    geo = cone()
    A = geo.volume_affine
    d, h, w = 3, 5, 2
    x = (w - 4) * 1.5 + 3.0
    y = (h - 3) * 2.0 - 2.0
    z = (d - 2) * 1.0 + 1.0
    torch.testing.assert_close(
        A @ torch.tensor([d, h, w, 1.0], dtype=torch.float64),
        torch.tensor([x, y, z, 1.0], dtype=torch.float64),
    )


def test_plucker_is_direction_and_moment():
    geo = cone()
    emb = geo.plucker(dtype=torch.float64)
    o, d = geo.rays(dtype=torch.float64)
    assert emb.shape == (4, 6, 6, 8)
    torch.testing.assert_close(emb[:, :3].permute(0, 2, 3, 1), d)
    # the moment is the same for any point on the ray
    torch.testing.assert_close(emb[:, 3:].permute(0, 2, 3, 1), torch.linalg.cross(o + 37.0 * d, d, dim=-1))


@pytest.mark.parametrize("make", [cone, parallel])
def test_json_round_trip(make):
    geo = make()
    back = geometry_from_json(geo.to_json())
    assert type(back) is type(geo) and back == geo
    torch.testing.assert_close(back.projection_matrices(), geo.projection_matrices())
    assert geo.subset([2, 0]).angles.tolist() == [2.0, 0.0]


def test_from_json_rejects_wrong_class_and_garbage():
    with pytest.raises(ValueError, match="ConeBeamGeometry"):
        ConeBeamGeometry.from_json(parallel().to_json())
    with pytest.raises(ValueError, match="parsed"):
        geometry_from_json("{not json")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dso=0.0), "dso"),
        (dict(dsd=-5.0), "dsd"),
        (dict(dsd=400.0), "exceed"),
        (dict(dso=5.0, dsd=800.0), "source lies inside the volume"),
        (dict(dso=500.0, dsd=501.0), "detector lies inside the volume"),
        (dict(angles=[]), "empty"),
        (dict(det_shape=(0, 4)), "det_shape"),
        (dict(vol_spacing=(1.0, -1.0, 1.0)), "vol_spacing"),
        (dict(angles=[[0.0, 1.0]]), "1-D"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cone(**kwargs)


def rigid(angle_x: float, angle_z: float, shift) -> torch.Tensor:
    cx, sx, cz, sz = math.cos(angle_x), math.sin(angle_x), math.cos(angle_z), math.sin(angle_z)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = rz @ rx
    m[:3, 3] = torch.tensor(shift, dtype=torch.float64)
    return m


def posed(make):
    poses = torch.stack([rigid(0.05 * i, 0.1 - 0.03 * i, (i, -2.0 * i, 0.5)) for i in range(4)])
    return make(poses=poses)


@pytest.mark.parametrize("make", [cone, parallel])
def test_posed_projection_matrices_map_ray_points_to_their_pixel(make):
    geo = posed(make)
    origins, dirs = geo.rays(dtype=torch.float64)
    col, row = homogeneous_project(geo.projection_matrices(), origins + 321.0 * dirs)
    torch.testing.assert_close(col, torch.arange(8, dtype=torch.float64).expand_as(col))
    torch.testing.assert_close(row, torch.arange(6, dtype=torch.float64)[:, None].expand_as(row))
    assert geometry_from_json(geo.to_json()) == geo
    torch.testing.assert_close(geo.subset([3, 1]).poses, geo.poses[[3, 1]])


@pytest.mark.parametrize("make", [cone, parallel])
def test_rotation_pose_about_the_axis_equals_an_angle_shift(make):
    phi = 0.3
    rotated = make(poses=torch.stack([rigid(0.0, phi, (0.0, 0.0, 0.0))] * 4))
    shifted = make(angles=[a + phi for a in COMMON["angles"]])
    for a, b in zip(rotated.rays(dtype=torch.float64), shifted.rays(dtype=torch.float64)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(rotated.projection_matrices(), shifted.projection_matrices())
    identity = make(poses=torch.eye(4, dtype=torch.float64).expand(4, 4, 4))
    torch.testing.assert_close(identity.vectors(), make().vectors())


def test_pose_validation():
    bad = torch.eye(4, dtype=torch.float64).repeat(4, 1, 1)
    bad[1, 0, 0] = 2.0
    with pytest.raises(ValueError, match="rigid"):
        cone(poses=bad)
    with pytest.raises(ValueError, match=r"poses must have shape \[V=4, 4, 4\]"):
        cone(poses=torch.eye(4).expand(3, 4, 4))


# Volume box of COMMON, written out from its fields: x = 3 +- 9/2 * 1.5, y = -2 +- 7/2 * 2, z = 1 +- 5/2 * 1.
BOX_LO, BOX_HI = (-3.75, -9.0, -1.5), (9.75, 5.0, 3.5)


@pytest.mark.parametrize(
    "angle, limit",
    [
        (0.0, -BOX_LO[0]),  # detector plane x = -(dsd - dso)
        (math.pi / 2, -BOX_LO[1]),  # detector plane y = -(dsd - dso)
        (math.pi, BOX_HI[0]),  # detector plane x = +(dsd - dso)
    ],
)
def test_detector_plane_may_not_cut_the_volume(angle, limit):
    # the detector plane sits dsd - dso from the isocentre; it must stay beyond the box face it faces
    cone(angles=[angle], dsd=500.0 + limit + 0.01)
    with pytest.raises(ValueError, match=r"detector lies inside the volume at view 0 \(angle"):
        cone(angles=[angle], dsd=500.0 + limit - 0.01)


@pytest.mark.parametrize("shift", [300.0, 900.0])  # detector centre inside the box; box behind the detector
def test_posed_detector_inside_or_before_the_volume_is_rejected(shift):
    # view 2 (angle 0: source at x = 500, detector plane x = -300) is moved by `shift` along world x, so
    # its source stays outside the box (x in [-3.75, 9.75]) while its detector plane passes the box
    angles = [0.7, 0.7, 0.0, 0.7]
    poses = torch.eye(4, dtype=torch.float64).repeat(4, 1, 1)
    cone(poses=poses, angles=angles)
    poses[2, 0, 3] = shift
    with pytest.raises(ValueError, match="detector lies inside the volume at view 2"):
        cone(poses=poses, angles=angles)
