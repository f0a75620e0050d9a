# Warning flags and build speed-ups for peft's own targets (tests, examples, benchmarks).
function(peft_target_defaults target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra)
    if(PEFT_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
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
