#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <torch/utils.h>

int main(int argc, char* argv[]) {
  // CTest runs two test processes at once on two cores; one intra-op thread each avoids
  // oversubscription and keeps results independent of the machine's core count.
  torch::set_num_threads(1);
  return Catch::Session().run(argc, argv);
}
