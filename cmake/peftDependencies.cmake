# Finds what peft's headers need. Shared by the build tree and the installed peftConfig.cmake
# so both resolve dependencies the same way.
macro(peft_find_dependencies)
  if(COMMAND find_dependency)
    set(_peft_find find_dependency)
  else()
    set(_peft_find find_package)
  endif()
  if(NOT TARGET torch)
    # TorchConfig.cmake warns about its own kineto lookup on CPU builds; that is not ours to fix.
    cmake_language(CALL ${_peft_find} Torch REQUIRED)
    # With two LibTorch installations on one machine (say a Python wheel and Debian's package),
    # TorchConfig.cmake can pair one's headers with the other's libraries; the result fails to
    # link with hundreds of undefined symbols. Say so plainly instead.
    if(TORCH_LIBRARY AND TORCH_INSTALL_PREFIX)
      get_filename_component(_peft_torch_lib "${TORCH_LIBRARY}" REALPATH)
      get_filename_component(_peft_torch_root "${TORCH_INSTALL_PREFIX}" REALPATH)
      string(FIND "${_peft_torch_lib}" "${_peft_torch_root}/" _peft_at)
      if(NOT _peft_at EQUAL 0 AND NOT _peft_torch_root STREQUAL "/usr")
        message(FATAL_ERROR "[peft] LibTorch headers come from ${_peft_torch_root} but libtorch "
          "from ${_peft_torch_lib}. Put ${_peft_torch_root} first in CMAKE_PREFIX_PATH "
          "(for the Python wheel: the folder of torch/__init__.py).")
      endif()
    endif()
  endif()
  if(NOT TARGET fmt::fmt-header-only)
    cmake_language(CALL ${_peft_find} fmt REQUIRED)
  endif()
  if(NOT TARGET nlohmann_json::nlohmann_json)
    cmake_language(CALL ${_peft_find} nlohmann_json 3 REQUIRED)
  endif()
  if(NOT TARGET peft::utf8proc)
    # utf8proc ships no CMake package on Debian; pkg-config, when present, only adds hints.
    find_package(PkgConfig QUIET)
    if(PKG_CONFIG_FOUND)
      pkg_check_modules(_PEFT_PC_UTF8PROC QUIET libutf8proc)
    endif()
    find_path(PEFT_UTF8PROC_INCLUDE_DIR utf8proc.h HINTS ${_PEFT_PC_UTF8PROC_INCLUDE_DIRS})
    find_library(PEFT_UTF8PROC_LIBRARY NAMES utf8proc HINTS ${_PEFT_PC_UTF8PROC_LIBRARY_DIRS})
    if(NOT PEFT_UTF8PROC_INCLUDE_DIR OR NOT PEFT_UTF8PROC_LIBRARY)
      message(FATAL_ERROR "[peft] utf8proc not found (utf8proc.h: ${PEFT_UTF8PROC_INCLUDE_DIR}, "
        "library: ${PEFT_UTF8PROC_LIBRARY}); install it (Debian: libutf8proc-dev) or set "
        "PEFT_UTF8PROC_INCLUDE_DIR and PEFT_UTF8PROC_LIBRARY.")
    endif()
    add_library(peft::utf8proc UNKNOWN IMPORTED)
    set_target_properties(peft::utf8proc PROPERTIES
      IMPORTED_LOCATION "${PEFT_UTF8PROC_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${PEFT_UTF8PROC_INCLUDE_DIR}")
  endif()
  if(NOT TARGET peft::pcre2)
    # PCRE2's 8-bit library runs the BPE split patterns (Unicode classes, lookahead). Like
    # utf8proc it may ship no CMake package; pkg-config, when present, only adds hints.
    find_package(PkgConfig QUIET)
    if(PKG_CONFIG_FOUND)
      pkg_check_modules(_PEFT_PC_PCRE2 QUIET libpcre2-8)
    endif()
    find_path(PEFT_PCRE2_INCLUDE_DIR pcre2.h HINTS ${_PEFT_PC_PCRE2_INCLUDE_DIRS})
    find_library(PEFT_PCRE2_LIBRARY NAMES pcre2-8 HINTS ${_PEFT_PC_PCRE2_LIBRARY_DIRS})
    if(NOT PEFT_PCRE2_INCLUDE_DIR OR NOT PEFT_PCRE2_LIBRARY)
      message(FATAL_ERROR "[peft] PCRE2 not found (pcre2.h: ${PEFT_PCRE2_INCLUDE_DIR}, "
        "library: ${PEFT_PCRE2_LIBRARY}); install it (Debian: libpcre2-dev) or set "
        "PEFT_PCRE2_INCLUDE_DIR and PEFT_PCRE2_LIBRARY.")
    endif()
    add_library(peft::pcre2 UNKNOWN IMPORTED)
    set_target_properties(peft::pcre2 PROPERTIES
      IMPORTED_LOCATION "${PEFT_PCRE2_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${PEFT_PCRE2_INCLUDE_DIR}")
  endif()
endmacro()
