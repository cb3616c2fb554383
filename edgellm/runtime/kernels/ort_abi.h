// The few parts of ONNX Runtime's stable C ABI that edgellm's custom ops use, declared from the
// documented layout (the C API is a table of function pointers that only ever grows at the end, so a
// function's slot number never changes). Slot numbers and types are ABI facts; ONNX Runtime's own
// header is not needed to build, which keeps `pip install edgellm` free of a C++ SDK.
#pragma once
#include <cstddef>
#include <cstdint>

struct OrtStatus;
struct OrtValue;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtTensorTypeAndShapeInfo;
struct OrtCustomOpDomain;
struct OrtSessionOptions;
struct OrtApi;  // opaque here: read through OrtFn below

enum OrtErrorCodeValue { ORT_OK_ = 0, ORT_FAIL_ = 1, ORT_INVALID_ARGUMENT_ = 2 };
enum OrtElementType { ELEM_FLOAT = 1, ELEM_UINT8 = 2, ELEM_INT8 = 3, ELEM_INT64 = 7 };
constexpr uint32_t ORT_API_LEVEL = 17;  // ONNX Runtime 1.17+: KernelContext_ParallelFor

struct OrtApiBase {
    const OrtApi* (*GetApi)(uint32_t version);
    const char* (*GetVersionString)();
};

// Slot numbers of OrtApi members (zero-based, in the table's declaration order).
enum OrtSlot : size_t {
    SLOT_CreateStatus = 0,
    SLOT_CreateCustomOpDomain = 26,
    SLOT_CustomOpDomain_Add = 27,
    SLOT_AddCustomOpDomain = 28,
    SLOT_GetTensorMutableData = 51,
    SLOT_GetDimensionsCount = 61,
    SLOT_GetDimensions = 62,
    SLOT_GetTensorTypeAndShape = 65,
    SLOT_KernelInfoGetAttribute_int64 = 86,
    SLOT_KernelInfoGetAttribute_string = 87,
    SLOT_KernelContext_GetInput = 90,
    SLOT_KernelContext_GetOutput = 91,
    SLOT_ReleaseTensorTypeAndShapeInfo = 99,
    SLOT_KernelContext_ParallelFor = 274,
};

// The slot's function, typed by the caller: OrtFn<Signature>(api, SLOT_x)(args...).
template <typename F>
inline F* OrtFn(const OrtApi* api, OrtSlot slot) {
    return reinterpret_cast<F* const*>(api)[slot];
}

// OrtCustomOp as ONNX Runtime reads it for `version` 17 (members after GetEndVersion stay null).
struct OrtCustomOpV17 {
    uint32_t version;
    void* (*CreateKernel)(const OrtCustomOpV17*, const OrtApi*, const OrtKernelInfo*);
    const char* (*GetName)(const OrtCustomOpV17*);
    const char* (*GetExecutionProviderType)(const OrtCustomOpV17*);
    int (*GetInputType)(const OrtCustomOpV17*, size_t);
    size_t (*GetInputTypeCount)(const OrtCustomOpV17*);
    int (*GetOutputType)(const OrtCustomOpV17*, size_t);
    size_t (*GetOutputTypeCount)(const OrtCustomOpV17*);
    void (*KernelCompute)(void*, OrtKernelContext*);
    void (*KernelDestroy)(void*);
    int (*GetInputCharacteristic)(const OrtCustomOpV17*, size_t);   // 0 = required
    int (*GetOutputCharacteristic)(const OrtCustomOpV17*, size_t);
    int (*GetInputMemoryType)(const OrtCustomOpV17*, size_t);       // 0 = default (CPU)
    int (*GetVariadicInputMinArity)(const OrtCustomOpV17*);
    int (*GetVariadicInputHomogeneity)(const OrtCustomOpV17*);
    int (*GetVariadicOutputMinArity)(const OrtCustomOpV17*);
    int (*GetVariadicOutputHomogeneity)(const OrtCustomOpV17*);
    OrtStatus* (*CreateKernelV2)(const OrtCustomOpV17*, const OrtApi*, const OrtKernelInfo*, void**);
    OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
    void* InferOutputShapeFn;
    int (*GetStartVersion)(const OrtCustomOpV17*);
    int (*GetEndVersion)(const OrtCustomOpV17*);
    void* reserved[4];  // GetMayInplace .. ReleaseAliasMap: later versions, unused
};
