// Horovod 0.28.1 includes XlaBuilder from its pre-2.16 location; TensorFlow 2.21 moved it.
#include "xla/hlo/builder/xla_builder.h"
