// Test driver for edgellm's block kernels on another architecture (run under qemu-user by
// tests/test_kernels_cross.py): reads x (m x k float32) and x8-layout weights from files, writes
// y = x @ W^T (m x n float32) and W dequantized (n x k float32), prints the ISA path it was built with.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "block_matmul.h"

static std::vector<char> slurp(const char* path) {
    std::vector<char> data;
    if (FILE* f = std::fopen(path, "rb")) {
        char buf[1 << 16];
        size_t got;
        while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + got);
        std::fclose(f);
    }
    return data;
}

static void spill(const char* path, const void* data, size_t bytes) {
    FILE* f = std::fopen(path, "wb");
    if (!f || std::fwrite(data, 1, bytes, f) != bytes) std::exit(3);
    std::fclose(f);
}

int main(int argc, char** argv) {
    if (argc != 9) {
        std::fprintf(stderr, "usage: %s FMT M K N X W Y DEQ\n", argv[0]);
        return 2;
    }
    const int fmt = std::atoi(argv[1]);
    const long m = std::atol(argv[2]), k = std::atol(argv[3]), n = std::atol(argv[4]);
    std::vector<char> x = slurp(argv[5]), w = slurp(argv[6]);
    if ((long)x.size() != m * k * 4) return 4;
    std::vector<float> y(m * n), deq(n * k);
    if (edgellm_block_matmul((const float*)x.data(), m, k, (const uint8_t*)w.data(), fmt, n, y.data()) != 0) return 5;
    if (edgellm_dequantize_rows((const uint8_t*)w.data(), fmt, k, n, deq.data()) != 0) return 6;
    spill(argv[7], y.data(), y.size() * 4);
    spill(argv[8], deq.data(), deq.size() * 4);
    std::printf("%s\n", edgellm_kernel_isa());
    return 0;
}
