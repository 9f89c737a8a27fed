"""What a reader sees in the figures: labels that can be read."""

import matplotlib.pyplot as plt

import aletheia_utils as au

# 06's ladder of a default run (benchmarks/README.md): Q5_K_M and Q4_K_M, Q6_K and Q8_0 lie close together, and each
# imatrix level sits at its plain level's size
LADDER = [{"level": level, "size_bytes": int(mib * 2**20), "bpw": bpw, "perplexity": ppl}
          for level, mib, bpw, ppl in [("F16", 258.3, 16.0042, 26.75), ("Q8_0", 138.1, 8.51, 26.92),
                                       ("Q6_K", 132.0, 8.12, 27.09), ("Q5_K_M", 106.9, 6.56, 28.41),
                                       ("Q4_K_M", 100.6, 6.17, 28.53), ("Q5_K_M-imatrix", 106.9, 6.56, 27.60),
                                       ("Q4_K_M-imatrix", 100.6, 6.17, 27.71)]]


def test_quant_ladder_labels_overlap_nothing_and_stay_inside_the_axes():
    fig = au.plots.quant_ladder(LADDER, reference=26.7)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        frame = ax.get_window_extent(renderer)
        labels = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
        assert sorted(labels) == sorted(f"{r['level']} · {r['bpw']:.2f} bpw" for r in LADDER)
        boxes = [*labels.values(), ax.get_legend().get_window_extent(renderer)]
        for i, box in enumerate(boxes):
            assert not any(box.overlaps(other) for other in boxes[i + 1:]), list(labels)[i]
        points = ax.transData.transform([(r["size_bytes"] / 2**20, r["perplexity"]) for r in LADDER])
        for label, box in labels.items():  # inside the axes, so clear of the title too, and off every point
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, label
            assert box.count_contains(points) == 0, label
    finally:
        plt.close(fig)
