# Warning flags and build speed-ups for peft's own targets (tests, examples, benchmarks).
# PEFT_SANITIZE builds them with the sanitizers it names (scripts/test.sh --sanitize uses
# "address,undefined"); LibTorch itself stays uninstrumented.
set(PEFT_SANITIZE "" CACHE STRING "Sanitizers for peft's own targets, e.g. address,undefined")
function(peft_target_defaults target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra)
    if(PEFT_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
    if(PEFT_SANITIZE)
      # -O1: the sanitizers' usual level (faster to compile than Release's -O3, and keeps
      # reports readable). gcc's -Wmaybe-uninitialized gives false positives inside libstdc++
      # (std::regex, std::function) under the sanitizers' instrumentation.
      target_compile_options(${target} PRIVATE -fsanitize=${PEFT_SANITIZE}
        -fno-sanitize-recover=all -fno-omit-frame-pointer -O1 -g1)
      if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
        target_compile_options(${target} PRIVATE -Wno-maybe-uninitialized)
      endif()
      target_link_options(${target} PRIVATE -fsanitize=${PEFT_SANITIZE})
    endif()
  endif()
endfunction()

# ccache with paths taken relative to the checkout (so every clone, CI's included, shares the
# cache) and the sloppiness precompiled headers need.
find_program(PEFT_CCACHE ccache)
if(PEFT_CCACHE AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  set(CMAKE_CXX_COMPILER_LAUNCHER
    ${CMAKE_COMMAND} -E env CCACHE_BASEDIR=${PROJECT_SOURCE_DIR}
    CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime ${PEFT_CCACHE}
    CACHE STRING "" FORCE)
endif()
