// The integer codes of the ops' arguments (docs/DESIGN.md 2, the kernel contract), shared by the C++, CUDA and host-check code.
#pragma once

#include <cstdint>

namespace ued_fast {

constexpr int64_t kTeacherLogits = 0, kTeacherLogProbs = 1, kTeacherProbs = 2;  // teacher_kind
constexpr int64_t kForwardKl = 0, kReverseKl = 1, kJsd = 2;                       // divergence
constexpr int64_t kMixProb = 0, kMixLogit = 1;                                    // ensemble mix

}  // namespace ued_fast
