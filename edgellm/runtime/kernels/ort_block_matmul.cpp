// ONNX Runtime custom ops of domain com.edgellm over GGUF blocks (kernels in block_matmul.cpp):
//   BlockMatMul(A float (..., K), B uint8 (ceil(N/8), K/32 * 8 * block bytes)) -> Y float (..., N)  Y = A @ W^T
//   BlockGather(ids int64 (...), B uint8 (ceil(N/8), K/32 * 8 * block bytes)) -> Y float (..., K)  rows of W
// attributes: K, N (rows of W), format ("Q4_0" | "Q4_1" | "Q8_0"); B in the x8 layout of block_matmul.cpp.
// The weights are the file's blocks (only reordered into x8 at export), lent by the runtime without a
// copy; the product runs on ONNX Runtime's intra-op thread pool (KernelContext_ParallelFor), groups of
// 8 output rows per task. A session may run on several caller threads: kernels are read-only state.
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "block_matmul.h"
#include "ort_abi.h"

namespace {

const OrtApi* g_api = nullptr;
// Tasks per product = the session's intra-op threads: ONNX Runtime then hands each thread one contiguous
// range (letting it schedule every index alone measured up to 2x slower). edgellm_set_threads sets it
// before a session is created; each kernel copies it when the session creates the kernel.
int g_threads = 0;

int64_t default_threads() {
    if (g_threads > 0) return g_threads;
    const unsigned hw = std::thread::hardware_concurrency();
    return hw ? (int64_t)hw : 1;
}

using CreateStatusFn = OrtStatus*(int, const char*);
using GetInputFn = OrtStatus*(const OrtKernelContext*, size_t, const OrtValue**);
using GetOutputFn = OrtStatus*(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
using MutableDataFn = OrtStatus*(OrtValue*, void**);
using TypeShapeFn = OrtStatus*(const OrtValue*, OrtTensorTypeAndShapeInfo**);
using DimCountFn = OrtStatus*(const OrtTensorTypeAndShapeInfo*, size_t*);
using DimsFn = OrtStatus*(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
using ReleaseShapeFn = void(OrtTensorTypeAndShapeInfo*);
using AttrIntFn = OrtStatus*(const OrtKernelInfo*, const char*, int64_t*);
using AttrStrFn = OrtStatus*(const OrtKernelInfo*, const char*, char*, size_t*);
using ParallelForFn = OrtStatus*(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*);

OrtStatus* error(const std::string& msg) {
    return OrtFn<CreateStatusFn>(g_api, SLOT_CreateStatus)(ORT_INVALID_ARGUMENT_, msg.c_str());
}

#define ORT_TRY(expr)                         \
    do {                                      \
        if (OrtStatus* st_ = (expr)) return st_; \
    } while (0)

OrtStatus* shape_of(const OrtValue* v, std::vector<int64_t>& dims) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    ORT_TRY(OrtFn<TypeShapeFn>(g_api, SLOT_GetTensorTypeAndShape)(v, &info));
    size_t n = 0;
    OrtStatus* st = OrtFn<DimCountFn>(g_api, SLOT_GetDimensionsCount)(info, &n);
    if (!st) {
        dims.assign(n, 0);
        st = OrtFn<DimsFn>(g_api, SLOT_GetDimensions)(info, dims.data(), n);
    }
    OrtFn<ReleaseShapeFn>(g_api, SLOT_ReleaseTensorTypeAndShapeInfo)(info);
    return st;
}

OrtStatus* input(OrtKernelContext* ctx, size_t i, const OrtValue** v, std::vector<int64_t>& dims, void** data) {
    ORT_TRY(OrtFn<GetInputFn>(g_api, SLOT_KernelContext_GetInput)(ctx, i, v));
    ORT_TRY(shape_of(*v, dims));
    return OrtFn<MutableDataFn>(g_api, SLOT_GetTensorMutableData)(const_cast<OrtValue*>(*v), data);
}

OrtStatus* output(OrtKernelContext* ctx, const std::vector<int64_t>& dims, float** data) {
    OrtValue* v = nullptr;
    ORT_TRY(OrtFn<GetOutputFn>(g_api, SLOT_KernelContext_GetOutput)(ctx, 0, dims.data(), dims.size(), &v));
    return OrtFn<MutableDataFn>(g_api, SLOT_GetTensorMutableData)(v, reinterpret_cast<void**>(data));
}

int format_code(const std::string& name) {
    if (name == "Q4_0") return FMT_Q4_0;
    if (name == "Q4_1") return FMT_Q4_1;
    if (name == "Q8_0") return FMT_Q8_0;
    return -1;
}

struct Kernel {
    std::string op;
    int64_t k = 0, n = 0, threads = 1;
    int fmt = -1;
};

OrtStatus* read_attributes(const OrtKernelInfo* info, Kernel* kern) {
    ORT_TRY(OrtFn<AttrIntFn>(g_api, SLOT_KernelInfoGetAttribute_int64)(info, "K", &kern->k));
    ORT_TRY(OrtFn<AttrIntFn>(g_api, SLOT_KernelInfoGetAttribute_int64)(info, "N", &kern->n));
    size_t size = 0;  // first call: the size, terminating zero included
    ORT_TRY(OrtFn<AttrStrFn>(g_api, SLOT_KernelInfoGetAttribute_string)(info, "format", nullptr, &size));
    std::string fmt(size, '\0');
    ORT_TRY(OrtFn<AttrStrFn>(g_api, SLOT_KernelInfoGetAttribute_string)(info, "format", &fmt[0], &size));
    fmt.resize(fmt.find('\0') == std::string::npos ? fmt.size() : fmt.find('\0'));
    kern->fmt = format_code(fmt);
    if (kern->fmt < 0) return error(kern->op + ": format '" + fmt + "' unknown; valid: Q4_0, Q4_1, Q8_0");
    if (kern->k <= 0 || kern->k % 32) return error(kern->op + ": K=" + std::to_string(kern->k) + " is not a positive multiple of 32");
    if (kern->n <= 0) return error(kern->op + ": N must be positive");
    return nullptr;
}

// x8 layout: (ceil(rows / 8), K/32 * 8 * block bytes) uint8
OrtStatus* check_table(const Kernel& kern, const std::vector<int64_t>& dims, int64_t rows) {
    const int64_t group_bytes = kern.k / 32 * 8 * block_bytes(kern.fmt);
    if (dims.size() != 2 || dims[0] != (rows + 7) / 8 || dims[1] != group_bytes)
        return error(kern.op + ": weight blocks must be uint8 (" + std::to_string((rows + 7) / 8) + ", " +
                     std::to_string(group_bytes) + ") for " + std::to_string(rows) + " rows of K=" +
                     std::to_string(kern.k) + " in 8-row groups");
    return nullptr;
}

// ---- BlockMatMul ---------------------------------------------------------------------------------

struct MatMulTask {
    const QuantizedRows* a;
    const uint8_t* w;
    int fmt;
    int64_t n, groups, chunk;  // chunk: 8-row groups per task
    float* y;
};

void matmul_chunk(void* data, size_t i) {
    auto* t = static_cast<MatMulTask*>(data);
    const int64_t begin = (int64_t)i * t->chunk;
    const int64_t end = begin + t->chunk < t->groups ? begin + t->chunk : t->groups;
    matmul_groups(t->a, t->w, t->fmt, t->n, begin, end, t->y);
}

struct QuantizeTask {
    const float* x;
    int64_t k, rows_per_task, m;
    int8_t* q;
    float *d, *s;
};

void quantize_chunk(void* data, size_t i) {
    auto* t = static_cast<QuantizeTask*>(data);
    const int64_t r0 = (int64_t)i * t->rows_per_task;
    const int64_t r1 = r0 + t->rows_per_task < t->m ? r0 + t->rows_per_task : t->m;
    const int64_t nb = t->k / 32;
    quantize_rows(t->x + r0 * t->k, r1 - r0, t->k, t->q + r0 * t->k, t->d + r0 * nb, t->s + r0 * nb);
}

// Both ops: input 0 (activations or ids) and input 1, the weight table, checked against K and N.
struct Operands {
    std::vector<int64_t> da, db;
    void* pa = nullptr;
    void* pb = nullptr;
};

OrtStatus* operands(OrtKernelContext* ctx, const Kernel& kern, Operands& ops) {
    const OrtValue* v;
    ORT_TRY(input(ctx, 0, &v, ops.da, &ops.pa));
    ORT_TRY(input(ctx, 1, &v, ops.db, &ops.pb));
    return check_table(kern, ops.db, kern.n);
}

OrtStatus* matmul_compute(void* state, OrtKernelContext* ctx) {
    const Kernel& kern = *static_cast<Kernel*>(state);
    Operands ops;
    ORT_TRY(operands(ctx, kern, ops));
    if (ops.da.empty() || ops.da.back() != kern.k)
        return error("BlockMatMul: input's last dimension must be K=" + std::to_string(kern.k));
    int64_t m = 1;
    for (size_t i = 0; i + 1 < ops.da.size(); ++i) m *= ops.da[i];
    std::vector<int64_t> dy(ops.da);
    dy.back() = kern.n;
    float* y;
    ORT_TRY(output(ctx, dy, &y));
    if (m == 0) return nullptr;

    // Quantized activations: per calling thread, reused across calls (the workers get raw pointers and
    // finish before the call returns); a buffer grown past 8 MB by a long forward is given back after it.
    thread_local std::vector<int8_t> q;
    thread_local std::vector<float> d, s;
    const int64_t nb = kern.k / 32;
    q.resize(m * kern.k);
    d.resize(m * nb);
    s.resize(m * nb);
    struct Shrink {
        ~Shrink() {
            if (q.capacity() > (8u << 20)) {
                std::vector<int8_t>().swap(q);
                std::vector<float>().swap(d);
                std::vector<float>().swap(s);
            }
        }
    } shrink;
    auto parallel = OrtFn<ParallelForFn>(g_api, SLOT_KernelContext_ParallelFor);
    const size_t batches = (size_t)kern.threads;
    QuantizeTask qt{static_cast<const float*>(ops.pa), kern.k, 8, m, q.data(), d.data(), s.data()};
    if (m <= qt.rows_per_task) quantize_chunk(&qt, 0);
    else ORT_TRY(parallel(ctx, quantize_chunk, (m + qt.rows_per_task - 1) / qt.rows_per_task, batches, &qt));

    QuantizedRows a{m, kern.k, nb, q.data(), d.data(), s.data()};
    // up to 64 tasks of at least 2 groups of 8 rows; ONNX Runtime runs them as `batches` contiguous ranges
    const int64_t groups = (kern.n + 7) / 8;
    int64_t chunk = (groups + 63) / 64;
    chunk = chunk < 2 ? 2 : chunk;
    MatMulTask task{&a, static_cast<const uint8_t*>(ops.pb), kern.fmt, kern.n, groups, chunk, y};
    const int64_t tasks = (groups + chunk - 1) / chunk;
    if (tasks == 1) matmul_chunk(&task, 0);
    else ORT_TRY(parallel(ctx, matmul_chunk, tasks, batches, &task));
    return nullptr;
}

// ---- BlockGather ---------------------------------------------------------------------------------

OrtStatus* gather_compute(void* state, OrtKernelContext* ctx) {
    const Kernel& kern = *static_cast<Kernel*>(state);
    Operands ops;
    ORT_TRY(operands(ctx, kern, ops));
    const int64_t vocab = kern.n;
    int64_t count = 1;
    for (int64_t v : ops.da) count *= v;
    std::vector<int64_t> dy(ops.da);
    dy.push_back(kern.k);
    float* y;
    ORT_TRY(output(ctx, dy, &y));
    const auto* ids = static_cast<const int64_t*>(ops.pa);
    for (int64_t t = 0; t < count; ++t) {
        if (ids[t] < 0 || ids[t] >= vocab)
            return error("BlockGather: token id " + std::to_string(ids[t]) + " outside [0, " + std::to_string(vocab) + ")");
        dequantize_row(static_cast<const uint8_t*>(ops.pb), kern.fmt, kern.k, ids[t], y + t * kern.k);
    }
    return nullptr;
}

// ---- registration --------------------------------------------------------------------------------

struct OpSpec {
    OrtCustomOpV17 op;
    const char* name;
    int inputs[2];
};

OpSpec* spec(const OrtCustomOpV17* op) { return reinterpret_cast<OpSpec*>(const_cast<OrtCustomOpV17*>(op)); }

// No C++ exception may cross into ONNX Runtime: each becomes an error status.
OrtStatus* create(const OrtCustomOpV17* op, const OrtApi*, const OrtKernelInfo* info, void** out) {
    try {
        auto* kern = new Kernel;
        kern->op = spec(op)->name;
        kern->threads = default_threads();
        if (OrtStatus* st = read_attributes(info, kern)) {
            delete kern;
            return st;
        }
        *out = kern;
        return nullptr;
    } catch (const std::exception& e) {
        return error(std::string(spec(op)->name) + ": " + e.what());
    }
}

OrtStatus* compute(void* state, OrtKernelContext* ctx) {
    const Kernel& kern = *static_cast<Kernel*>(state);
    try {
        return kern.op == "BlockMatMul" ? matmul_compute(state, ctx) : gather_compute(state, ctx);
    } catch (const std::exception& e) {
        return error(kern.op + ": " + e.what());
    }
}

OpSpec make_op(const char* name, int in0) {
    OpSpec s{};
    s.name = name;
    s.inputs[0] = in0;
    s.inputs[1] = ELEM_UINT8;
    OrtCustomOpV17& op = s.op;
    op.version = ORT_API_LEVEL;
    op.GetName = [](const OrtCustomOpV17* o) { return (const char*)spec(o)->name; };
    op.GetExecutionProviderType = [](const OrtCustomOpV17*) -> const char* { return nullptr; };  // CPU
    op.GetInputType = [](const OrtCustomOpV17* o, size_t i) { return spec(o)->inputs[i]; };
    op.GetInputTypeCount = [](const OrtCustomOpV17*) -> size_t { return 2; };
    op.GetOutputType = [](const OrtCustomOpV17*, size_t) { return (int)ELEM_FLOAT; };
    op.GetOutputTypeCount = [](const OrtCustomOpV17*) -> size_t { return 1; };
    op.KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
    op.GetInputCharacteristic = [](const OrtCustomOpV17*, size_t) { return 0; };
    op.GetOutputCharacteristic = [](const OrtCustomOpV17*, size_t) { return 0; };
    op.GetInputMemoryType = [](const OrtCustomOpV17*, size_t) { return 0; };
    op.GetVariadicInputMinArity = [](const OrtCustomOpV17*) { return 1; };
    op.GetVariadicInputHomogeneity = [](const OrtCustomOpV17*) { return 1; };
    op.GetVariadicOutputMinArity = [](const OrtCustomOpV17*) { return 1; };
    op.GetVariadicOutputHomogeneity = [](const OrtCustomOpV17*) { return 1; };
    op.CreateKernelV2 = create;
    op.KernelComputeV2 = compute;
    op.GetStartVersion = [](const OrtCustomOpV17*) { return 1; };
    op.GetEndVersion = [](const OrtCustomOpV17*) { return 2147483647; };
    return s;
}

// One domain object for the process: ONNX Runtime keeps pointers to the ops for every session.
OpSpec g_matmul = make_op("BlockMatMul", ELEM_FLOAT);
OpSpec g_gather = make_op("BlockGather", ELEM_INT64);
OrtCustomOpDomain* g_domain = nullptr;

}  // namespace

EDGELLM_EXPORT void edgellm_set_threads(int threads) { g_threads = threads > 0 ? threads : 0; }

EDGELLM_EXPORT OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
    const OrtApi* api = base->GetApi(ORT_API_LEVEL);
    if (!api) {  // older than 1.17: its version-1 table still makes statuses (slot 0 is in every version)
        const OrtApi* v1 = base->GetApi(1);
        return v1 ? OrtFn<CreateStatusFn>(v1, SLOT_CreateStatus)(ORT_FAIL_, "edgellm's kernels need ONNX Runtime 1.17 or newer")
                  : nullptr;
    }
    g_api = api;
    using CreateDomainFn = OrtStatus*(const char*, OrtCustomOpDomain**);
    using DomainAddFn = OrtStatus*(OrtCustomOpDomain*, const OrtCustomOpV17*);
    using AddDomainFn = OrtStatus*(OrtSessionOptions*, OrtCustomOpDomain*);
    if (!g_domain) {
        ORT_TRY(OrtFn<CreateDomainFn>(api, SLOT_CreateCustomOpDomain)("com.edgellm", &g_domain));
        ORT_TRY(OrtFn<DomainAddFn>(api, SLOT_CustomOpDomain_Add)(g_domain, &g_matmul.op));
        ORT_TRY(OrtFn<DomainAddFn>(api, SLOT_CustomOpDomain_Add)(g_domain, &g_gather.op));
    }
    return OrtFn<AddDomainFn>(api, SLOT_AddCustomOpDomain)(options, g_domain);
}
