// The block top-k of csrc/cuda/attend.cu on the CPU, with its list code (csrc/cuda/topk_net.cuh)
// and the 256 threads, the warps' reductions (__reduce_max_sync / __reduce_min_sync) and the
// lanes' shuffles emulated:
//   topk_lists         block_best (per-thread lists, warp rounds, warp 0's rounds over the
//                      warps' candidates) and write_ascending;
//   seam merge         the seam's select CTA ranks the blocks not cut now (block_best over the
//                      scores outside [c0, c1)), and seam_finish_merge merges its list with the
//                      cut blocks' scores in one warp's rounds.
// Both against a plain sort.  Prints "cases N wrong M"; exits 1 on any wrong case.  Built and
// run by tests/test_topk_net.py.
#include "topk_net.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {
constexpr int THREADS = 256, WARPS = THREADS / 32, K = 8;
constexpr uint32_t NONE = 0xffffffffu;
using List = qllm_topk::List<K>;

uint32_t score_key(float v) {  // as attend.cu's score_key
    if (v != v) return 0u;
    if (v == 0.0f) v = 0.0f;
    uint32_t b;
    std::memcpy(&b, &v, 4);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

struct Pair {
    uint32_t k = 0u, i = NONE;
};

/* warp_rounds over lanes[0..32): returns lane r's (wk, wi) for every lane */
std::vector<Pair> warp_rounds(List *lanes, int k) {
    std::vector<Pair> w(32);
    for (int r = 0; r < k; ++r) {
        uint32_t kmax = 0u, imin = NONE;
        for (int l = 0; l < 32; ++l) kmax = std::max(kmax, lanes[l].key[0]);
        for (int l = 0; l < 32; ++l)
            if (lanes[l].key[0] == kmax) imin = std::min(imin, lanes[l].idx[0]);
        w[r] = {kmax, imin};
        int pops = 0;
        for (int l = 0; l < 32; ++l) pops += lanes[l].pop_if(kmax, imin) ? 1 : 0;
        if (imin != NONE && pops != 1) {  // distinct indices: exactly one head wins (none: all "pop" none)
            std::printf("round %d: %d lists popped\n", r, pops);
            std::exit(1);
        }
    }
    return w;
}

/* block_best: per-thread lists fed with (key(src[i]), i) for the kept i (strided, in order), warp
 * rounds, warp 0's rounds over the candidates; lane r of warp 0's (wk, wi) */
template <typename Keep>
std::vector<Pair> block_best(const std::vector<float> &src, int k, Keep keep) {
    const int n = static_cast<int>(src.size());
    List t[THREADS];
    for (auto &l : t) l.clear();
    for (int tid = 0; tid < THREADS; ++tid)
        for (int i = tid; i < n; i += THREADS)
            if (keep(i)) t[tid].insert(score_key(src[i]), static_cast<uint32_t>(i));
    std::vector<Pair> cand(WARPS * K);
    for (int w = 0; w < WARPS; ++w) {
        const std::vector<Pair> win = warp_rounds(t + 32 * w, k);
        for (int lane = 0; lane < k; ++lane) cand[w * K + lane] = win[lane];
    }
    List w0[32];
    for (auto &l : w0) l.clear();
    for (int lane = 0; lane < 32; ++lane)
        for (int c = lane; c < WARPS * K; c += 32)
            if (c % K < k) w0[lane].insert(cand[c].k, cand[c].i);
    return warp_rounds(w0, k);
}

/* write_ascending: lane r's winner to its rank among the k winners (none last, as -1) */
std::vector<int32_t> write_ascending(const std::vector<Pair> &w, int k) {
    std::vector<int32_t> ids(k, 12345);
    for (int lane = 0; lane < k; ++lane) {
        int rank = 0;
        for (int j = 0; j < k; ++j) rank += (w[j].i < w[lane].i || (w[j].i == w[lane].i && j < lane)) ? 1 : 0;
        ids[rank] = w[lane].i == NONE ? -1 : static_cast<int32_t>(w[lane].i);
    }
    return ids;
}

std::vector<int32_t> topk_lists(const std::vector<float> &src, int k) {
    return write_ascending(block_best(src, k, [](int) { return true; }), k);
}

/* the seam: select CTA over the blocks outside [c0, c1), then seam_finish_merge's warp 0 */
std::vector<int32_t> seam_merge(const std::vector<float> &src, int k, int c0, int c1) {
    const int n = static_cast<int>(src.size());
    const std::vector<Pair> part = block_best(src, k, [&](int i) { return i < c0 || i >= c1; });
    List lanes[32];
    for (auto &l : lanes) l.clear();
    for (int lane = 0; lane < 32; ++lane) {
        if (lane < k) lanes[lane].insert(part[lane].k, part[lane].i);
        for (int j = lane; j < c1 - c0; j += 32)
            if (c0 + j < n) lanes[lane].insert(score_key(src[c0 + j]), static_cast<uint32_t>(c0 + j));
    }
    return write_ascending(warp_rounds(lanes, k), k);
}

std::vector<int32_t> reference(const std::vector<float> &src, int k) {
    const int n = static_cast<int>(src.size());
    std::vector<int> ord(n);
    for (int i = 0; i < n; ++i) ord[i] = i;
    std::stable_sort(ord.begin(), ord.end(), [&](int a, int b) { return score_key(src[a]) > score_key(src[b]); });
    std::vector<int32_t> want(ord.begin(), ord.begin() + std::min(n, k));
    std::sort(want.begin(), want.end());
    while (static_cast<int>(want.size()) < k) want.push_back(-1);
    return want;
}
}  // namespace

int main() {
    unsigned rng = 2024u;
    int cases = 0, wrong = 0;
    for (int n : {0, 1, 7, 8, 9, 31, 64, 255, 256, 257, 774, 1000, 1024, 2049, 4096, 8192}) {
        for (int k = 1; k <= K; ++k) {
            for (int levels : {1, 3, 50, 1 << 30}) {
                std::vector<float> h(n);
                for (int i = 0; i < n; ++i) {
                    rng = rng * 1664525u + 1013904223u;
                    const int q = static_cast<int>((rng >> 8) % static_cast<unsigned>(std::min(levels, 1 << 23)));
                    h[i] = (q - 20) * 0.37f;
                    if (levels == 50 && q % 7 == 3) h[i] = -INFINITY;
                    if (levels == 50 && q % 11 == 5) h[i] = NAN;
                    if (levels == 3 && i % 5 == 0) h[i] = (i % 10 == 0) ? -0.0f : 0.0f;
                }
                const std::vector<int32_t> want = reference(h, k);
                ++cases;
                if (topk_lists(h, k) != want) {
                    if (wrong < 5) std::printf("wrong: topk_lists n=%d k=%d levels=%d\n", n, k, levels);
                    ++wrong;
                }
                // cut ranges: the last blocks (as in prefill), a middle run, past the end, none
                const int c0s[] = {std::max(0, n - 4), n / 3, std::max(0, n - 2), n};
                for (int c0 : c0s) {
                    const int c1 = c0 == n / 3 ? c0 + 9 : c0 + 4;
                    // the cut blocks win or lose: their scores raised to the top on odd cases
                    std::vector<float> g = h;
                    if ((cases & 1) != 0)
                        for (int i = c0; i < std::min(c1, n); ++i) g[i] = 1e30f;
                    ++cases;
                    if (seam_merge(g, k, c0, c1) != reference(g, k)) {
                        if (wrong < 5) std::printf("wrong: seam merge n=%d k=%d levels=%d c0=%d\n", n, k, levels, c0);
                        ++wrong;
                    }
                }
            }
        }
    }
    std::printf("cases %d wrong %d\n", cases, wrong);
    return wrong == 0 ? 0 : 1;
}
