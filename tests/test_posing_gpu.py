"""Posing on the GPU: the posing kernels built for CUDA from the CPU kernels' bodies (the pose-blended
weight field, forward skinning of the tissue points, the nearest skinned point of each warp node,
inverse skinning at the warp nodes and the air border) give the CPU kernels' results (numba's CUDA
simulator, tiny inputs)."""
import textwrap

import pytest

from conftest import cuda_simulator_errors

CUDASIM_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, os.path.join(sys.argv[1], "tools"))
    from launch import load_package
    load_package("ctwin")
    import numpy as np
    from numba import cuda
    from ctwin.core.twin import articulated as A
    from ctwin.core.volumes.volume import affine_from, invert_affine

    rng = np.random.default_rng(5)
    k, g = A._kernels(), A.posing_cuda_kernels()

    def launch(kern, n, *args):
        kern[max(1, -(-n // 32)), 32](*args)

    def rot(ax, a):
        ax = np.asarray(ax, float) / np.linalg.norm(ax)
        K = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
        return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K

    # a 5 x 4 x 6 weight field over 4 joints, 1-2 channels per node, some nodes without weights
    wshape = (5, 4, 6)
    nw = int(np.prod(wshape))
    cnt = rng.integers(0, 3, nw)
    cnt[:4] = 0
    Wp = np.zeros(nw + 1, np.int64)
    Wp[1:] = np.cumsum(cnt)
    Wc = np.concatenate([rng.choice(4, c, replace=False) for c in cnt]).astype(np.int64)
    Wv = rng.uniform(0.2, 1.0, int(Wp[-1]))
    waff_w = affine_from((6.0, 6.0, 5.0), (-15.0, -12.0, -14.0))
    w_inv = np.ascontiguousarray(invert_affine(waff_w)[:3])
    D = np.zeros((4, 3, 4))
    for j in range(4):
        D[j, :, :3] = rot(rng.normal(size=3), rng.uniform(0.0, 0.5) if j else 0.0)
        D[j, :, 3] = rng.uniform(-6, 6, 3) if j else 0.0
    res = {}

    # (1) the blended field and the forward skinning of tissue points
    P, S = np.empty((nw, 12)), np.empty(nw)
    k["blend_field"](Wp, Wc, Wv, D, P, S)
    dP, dS = cuda.device_array((nw, 12)), cuda.device_array(nw)
    launch(g["blend_field"], nw, cuda.to_device(Wp), cuda.to_device(Wc), cuda.to_device(Wv), cuda.to_device(D), dP, dS)
    res["blend_P"] = [float(np.abs(P - dP.copy_to_host()).max()), float(np.abs(P).max())]
    res["blend_S"] = [float(np.abs(S - dS.copy_to_host()).max()), float(S.max())]
    idx = np.argwhere(np.ones(wshape, bool))[rng.choice(nw, 40, replace=False)]
    xs = np.ascontiguousarray(idx @ waff_w[:3, :3].T + waff_w[:3, 3] + rng.uniform(-2, 2, (40, 3)))
    W = (np.asarray(wshape, np.int64), P, S)  # as _sparse_weights gives it
    ys, Minv = np.empty_like(xs), np.empty((len(xs), 3, 4))
    k["forward_blend"](xs, W, w_inv, D, ys, Minv)
    dW = wshape + (dP, dS)
    dys, dMinv = cuda.device_array(xs.shape), cuda.device_array((len(xs), 3, 4))
    launch(g["forward_blend"], len(xs), cuda.to_device(xs), *dW, cuda.to_device(w_inv), cuda.to_device(D), dys, dMinv)
    res["forward_ys"] = [float(np.abs(ys - dys.copy_to_host()).max()), float(np.abs(ys).max())]
    res["forward_Minv"] = [float(np.abs(Minv - dMinv.copy_to_host()).max()), float(np.abs(Minv).max())]

    # (2) inverse skinning at the nodes of a 5 x 6 x 5 warp grid (the nearest points found on the CPU),
    # then the air border
    waff = affine_from((7.0, 6.0, 7.0), (-16.0, -14.0, -16.0))
    wn = np.array([5, 6, 5], np.int64)
    N = int(np.prod(wn))
    best, src = np.full(N, np.inf), np.full(N, -1, np.int64)
    A._nearest_points(ys, waff, wn, 9.0, best, src)
    # the nearest search on the device, from the CPU's slab order (``_nearest_points``'s inputs)
    ninv = np.ascontiguousarray(invert_affine(waff)[:3])
    g0 = ys[:, 0] * ninv[0, 0] + ys[:, 1] * ninv[0, 1] + ys[:, 2] * ninv[0, 2] + ninv[0, 3]
    slab = np.clip(np.floor(g0), 0, wn[0] - 1).astype(np.int64)
    order = np.argsort(slab, kind="stable")
    starts = np.zeros(int(wn[0]) + 1, np.int64)
    np.cumsum(np.bincount(slab, minlength=int(wn[0])), out=starts[1:])
    dbest, dsrc = cuda.to_device(np.full(N, np.inf)), cuda.to_device(np.full(N, -1, np.int64))
    launch(g["splat_nearest"], int(wn[0] * wn[1]), dys, cuda.to_device(order), cuda.to_device(starts),
           cuda.to_device(g0), cuda.to_device(np.ascontiguousarray(waff[:3])), cuda.to_device(ninv),
           cuda.to_device(wn), 9.0, dbest, dsrc)
    gsrc, gbest = dsrc.copy_to_host(), dbest.copy_to_host()
    res["nearest"] = [int(np.count_nonzero(gsrc != src)) + int(np.count_nonzero(gbest != best)),
                      float((src >= 0).sum())]
    near = (rng.uniform(size=wshape) < 0.4).astype(np.uint8)
    out = {}
    for dev in ("cpu", "cuda"):
        disp, r, st = np.empty((N, 3), np.float32), np.empty(N), np.empty(N, np.int8)
        if dev == "cpu":
            k["inverse_lbs_nodes"](np.ascontiguousarray(waff[:3]), wn, W, w_inv, D, near, src, Minv, 8, 0.05, 3.0,
                                   disp, r, st)
            pre = st.copy()
            k["air_border"](wn, st, disp, 1.0)
        else:
            dd, dr, dst = cuda.to_device(disp), cuda.to_device(r), cuda.to_device(st)
            dwn = cuda.to_device(wn)
            launch(g["inverse_lbs_nodes"], N, cuda.to_device(np.ascontiguousarray(waff[:3])), dwn, *dW,
                   cuda.to_device(w_inv), cuda.to_device(D), cuda.to_device(near), cuda.to_device(src), dMinv, 8,
                   0.05, 3.0, dd, dr, dst)
            pre = dst.copy_to_host()
            launch(g["border_mark"], N, dwn, dst, dd, 1.0)
            launch(g["border_air"], N, dst, dd)
            disp, r, st = dd.copy_to_host(), dr.copy_to_host(), dst.copy_to_host()
        out[dev] = (disp, r, st, pre)
    (dc, rc, sc, pc), (dg, rg, sg, pg) = out["cpu"], out["cuda"]
    fin = np.isfinite(dc)
    res["inverse_status"] = [int(np.count_nonzero(pc != pg)) + int(np.count_nonzero(sc != sg)),
                             float((pc == 1).sum())]
    res["inverse_disp"] = [float(np.abs(dc[fin] - dg[fin]).max()) + float(np.count_nonzero(fin != np.isfinite(dg))),
                           float(np.abs(dc[fin]).max())]
    res["inverse_res"] = [float(np.abs(rc - rg).max()), float(rc.max())]
    # the cases exercised: solved, air, unreached, and nodes that the air border turned to air
    res["cases"] = [0, float(min((pc == 1).sum(), (pc == 2).sum() + 1, (pc == 0).sum(), (sc != pc).sum() + 1))]
    res["border_air"] = [0, float((sc != pc).sum())]

    # (3) the slab order on the device (a stable counting sort, 11 chunks of 64 points) equals the
    # host's: points below and beyond the slabs (clipped), and many in one slab (ties by index)
    wn7 = np.array([7, 6, 5], np.int64)
    yk = rng.uniform(-25.0, 40.0, (700, 3))
    yk[::5] = yk[1::5][: len(yk[::5])]  # repeated points: equal g0
    ninv7, g07, order7, starts7 = A._slab_order(yk, waff, wn7)
    r = {}
    dord, dstarts, dg0 = A._device_slab_order(g, r, cuda.to_device(yk), cuda.to_device(ninv7), 7, 64)
    res["slab_order"] = [int(np.count_nonzero(dord.copy_to_host() != order7))
                         + int(np.count_nonzero(dstarts.copy_to_host() != starts7))
                         + int(np.count_nonzero(dg0.copy_to_host() != g07)), float(len(order7))]
    res["slab_cases"] = [0, float(min(starts7[1], len(yk) - starts7[-2], 1 + len(yk) - len(np.unique(g07))))]

    # (4) the warp's summary by device reductions equals numpy's (p99 of the solved residuals:
    # coarse values, so the ranks interpolated between repeat, then distinct values)
    ties = []
    for case, step in (("repeats", 0.05), ("distinct", 0.0)):
        st4 = rng.choice(np.array([0, 1, 1, 1, 2], np.int8), 500)
        r4 = rng.exponential(0.3, 500)
        if step:
            r4 = np.minimum(np.round(r4 / step) * step, 0.6)  # the top 13 % all 0.6
        sm = A._device_summary(g, r, cuda.to_device(st4), cuda.to_device(r4))
        sol = r4[st4 == 1]
        ns = int(sm[0])
        want = [len(sol), int(np.sum(st4 == 2)), float(np.percentile(sol, 99)), float(sol.max()),
                float(np.mean(sol > 0.5))]
        got = [ns, int(sm[1]), A._percentile_from_ranks(ns, 0.99, sm[4], sm[5]), float(sm[3]), float(sm[2] / ns)]
        res["summary_" + case] = [sum(abs(float(a) - float(b)) for a, b in zip(want, got)), float(len(sol))]
        srt, kk = np.sort(sol), int(np.floor((len(sol) - 1) * 0.99))
        ties.append(srt[kk] == srt[kk + 1])
    res["summary_cases"] = [0, float(ties == [True, False])]  # both branches of the next rank
    print("RESULT" + json.dumps(res))
""")


@pytest.mark.cudasim
def test_posing_kernels_on_cuda_equal_cpu_under_simulator(tmp_path):
    res = cuda_simulator_errors(CUDASIM_SCRIPT, tmp_path, entries=15)
    # the simulator evaluates the bodies' IEEE operations in the CPU kernels' order: equal to the bit
    for key, (diff, _) in res.items():
        assert diff == 0, key
    assert res["inverse_status"][0] == 0  # every node's status (solved, air, unreached) as on the CPU
    assert res["cases"][1] >= 1  # solved, air and unreached nodes all occur
    assert res["slab_cases"][1] >= 1  # clipped points at both ends and equal first coordinates occur
    assert res["summary_cases"][1] == 1  # the p99's two ranks equal in one case, distinct in the other


POSED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, os.path.join(sys.argv[1], "tools"))
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    from launch import load_package
    load_package("ctwin")
    import numpy as np
    from test_articulated import _knee_flexion, synthetic_ct
    from ctwin.core.drr.carm import default_views
    from ctwin.core.drr.device_transfers import count_transfers
    from ctwin.core.drr.projector import OnDevice, compose_scene
    from ctwin.core.twin import articulated as A

    ct, seg, names = synthetic_ct()
    art = A.prepare_articulated(ct, seg, names, weight_spacing_mm=8.0)
    A._DevicePosing.CHUNK = 16  # several chunks of the slab sort on this small twin
    g = default_views(ct.bbox_world(), size=8)["ap"]
    res = {}
    for f, deg in enumerate((30.0, -20.0)):  # the second pose reuses the device-resident arrays
        jd = _knee_flexion(deg)
        a = A.posed_scene(art, {}, jd, warp_spacing_mm=12.0)
        with count_transfers() as led:
            b = A.posed_scene(art, {}, jd, warp_spacing_mm=12.0, device="cuda")
            img = A.render_posed(b, g, device="cuda")
        # the displacement grid stayed on the device (composed there in place)
        res[f"on_device{f}"] = [0 if isinstance(b.warp[0], OnDevice) and b.warp[0]._host is None else 1, 1]
        wa, wb = a.warp[0], np.asarray(b.warp[0])
        same_nan = bool(np.array_equal(np.isnan(wa), np.isnan(wb)))
        fin = np.isfinite(wa)
        res[f"warp{f}"] = [float(np.abs(wa[fin] - wb[fin]).max()) + (0 if same_nan else 1e9), float(np.abs(wa[fin]).max())]
        res[f"info{f}"] = [0 if a.info == b.info else 1, float(a.info["solved_nodes"])]  # every key, exactly
        fc, fg = compose_scene(a, "cpu"), compose_scene(b, "cuda").host()
        fh = compose_scene(b, "cpu")  # the device's grid read on the host (the --kvp physics' path)
        res[f"frame{f}"] = [int(np.count_nonzero(fc.flat != fg.flat)) + int(np.count_nonzero(fc.flat != fh.flat)),
                            float(np.abs(fc.flat.astype(np.int64)).max())]
        ref = A.render_posed(a, g, device="cpu")
        res[f"image{f}"] = [float(np.abs(ref - img).max()), float(ref.max())]
        if f == 1:
            # per frame up: the joint transforms; the grid's maps (2 x 3 x 4) and shape once sized; the
            # composition's float64 and int64 parameters (the warp's maps, the parts' placements); the
            # render's geometry and the frame's index map. Down: the points' bounds and the warp's
            # summary (6 float64 each) and the image
            nparts = len(b.parts)
            up = [len(art.weight_joints) * 96, 192 + 24, 8 * (33 + 12 * nparts) + 8 * (9 + 10 * nparts),
                  g.packed().nbytes + 96]
            down = 48 + 48 + img.nbytes
            sys.stderr.write(led.summary() + "\\n")
            res["transfers_up"] = [abs(led.total("up") - sum(up)) + abs(led.count("up") - 7), float(sum(up))]
            res["transfers_down"] = [abs(led.total("down") - down) + abs(led.count("down") - 3), float(down)]
    print("RESULT" + json.dumps(res))
""")


@pytest.mark.cudasim
def test_posed_scene_on_cuda_equals_cpu_under_simulator(tmp_path):
    """``posed_scene(..., device="cuda")`` on a small leg CT (knee flexed 30 then -20 degrees): the
    warp, its summary, the frame composed on the device from the grid left there, and the DRR equal the
    CPU's; per new pose only the joint transforms and a few hundred bytes of parameters go up, and the
    image and 12 scalars come back (``device_transfers.count_transfers``)."""
    res = cuda_simulator_errors(POSED_SCRIPT, tmp_path, entries=12)
    for f in range(2):
        assert res[f"warp{f}"][0] == 0 and res[f"info{f}"][0] == 0 and res[f"frame{f}"][0] == 0, f
        assert res[f"on_device{f}"][0] == 0 and res[f"image{f}"][0] == 0, f
    assert res["transfers_up"][0] == 0 and res["transfers_down"][0] == 0
