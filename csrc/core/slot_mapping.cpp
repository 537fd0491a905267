#include "core/slot_mapping.h"

namespace trail {

void slot_mapping_cpu(const SlotMappingArgs& args) {
  for (int64_t i = 0; i < args.n; ++i) args.out[i] = slot_of_token(args, i);
}

}  // namespace trail
