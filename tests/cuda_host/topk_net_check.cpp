// The block top-k of csrc/cuda/attend.cu (topk_lists) on the CPU: its list and merge
// network (csrc/cuda/topk_net.cuh) with the 256 threads' lists and the warps'
// butterfly exchanges (__shfl_xor_sync) emulated, against a plain sort.  Prints
// "cases N wrong M"; exits 1 on any wrong case.  Built and run by tests/test_topk_net.py.
#include "topk_net.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {
constexpr int THREADS = 256, WARPS = THREADS / 32, K = 8;
using List = qllm_topk::List<K>;

uint32_t score_key(float v) {  // as attend.cu's score_key
    if (v != v) return 0u;
    if (v == 0.0f) v = 0.0f;
    uint32_t b;
    std::memcpy(&b, &v, 4);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* levels of lane ^ m exchanges among lanes[0..32) (all lanes take part, as in a warp) */
void warp_merge(List *lanes, int levels) {
    for (int m = 1; m < (1 << levels); m <<= 1) {
        List snap[32];
        std::copy(lanes, lanes + 32, snap);
        for (int l = 0; l < 32; ++l) lanes[l].merge(snap[l ^ m]);
    }
}

std::vector<int32_t> topk_lists(const std::vector<float> &src, int k) {
    const int n = static_cast<int>(src.size());
    List t[THREADS];
    for (auto &l : t) l.clear();
    // insertion order of the kernel: batches of 8 strided elements per thread
    for (int tid = 0; tid < THREADS; ++tid)
        for (int i = tid; i < n; i += THREADS) t[tid].insert(score_key(src[i]), static_cast<uint32_t>(i));
    List cand[WARPS];
    for (int w = 0; w < WARPS; ++w) {
        warp_merge(t + 32 * w, 5);
        for (int l = 1; l < 32; ++l)  // every lane holds the warp's list
            for (int j = 0; j < K; ++j)
                if (t[32 * w + l].key[j] != t[32 * w].key[j] || t[32 * w + l].idx[j] != t[32 * w].idx[j]) {
                    std::printf("lane %d of warp %d differs\n", l, w);
                    std::exit(1);
                }
        cand[w] = t[32 * w];
    }
    List w0[32];
    for (int l = 0; l < 32; ++l) {
        if (l < WARPS)
            w0[l] = cand[l];
        else
            w0[l].clear();
    }
    warp_merge(w0, 3);
    std::vector<uint32_t> wi(32);
    for (int l = 0; l < 32; ++l) wi[l] = w0[l].idx_at(l < K ? l : 0);
    std::vector<int32_t> ids(k, 12345);
    for (int lane = 0; lane < k; ++lane) {
        int rank = 0;
        for (int j = 0; j < k; ++j) rank += (wi[j] < wi[lane] || (wi[j] == wi[lane] && j < lane)) ? 1 : 0;
        ids[rank] = wi[lane] == 0xffffffffu ? -1 : static_cast<int32_t>(wi[lane]);
    }
    return ids;
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
                ++cases;
                if (topk_lists(h, k) != reference(h, k)) {
                    if (wrong < 5) std::printf("wrong: n=%d k=%d levels=%d\n", n, k, levels);
                    ++wrong;
                }
            }
        }
    }
    std::printf("cases %d wrong %d\n", cases, wrong);
    return wrong == 0 ? 0 : 1;
}
