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
  if(NOT TARGET peft::distributed)
    # Data-parallel training (peft/train/distributed.hpp) runs on LibTorch's c10d with Gloo. The
    # pip wheel's LibTorch has both compiled in and ships c10d's headers but not Gloo's, which
    # ProcessGroupGloo.hpp includes: they come from elsewhere (Debian: libgloo-dev). A probe that
    # makes the calls distributed.hpp makes must compile and link; otherwise peft::distributed
    # still exists and the header says why distributed training is unavailable.
    add_library(peft::distributed INTERFACE IMPORTED)
    if(NOT DEFINED PEFT_C10D_OK)
      set(_peft_c10d_why "")
      find_path(PEFT_C10D_INCLUDE_DIR torch/csrc/distributed/c10d/ProcessGroupGloo.hpp
        PATHS ${TORCH_INCLUDE_DIRS} NO_DEFAULT_PATH)
      find_path(PEFT_GLOO_INCLUDE_DIR gloo/rendezvous/store.h)
      if(NOT PEFT_C10D_INCLUDE_DIR)
        set(_peft_c10d_why "LibTorch ${Torch_VERSION} has no c10d headers (ProcessGroupGloo.hpp)")
      elseif(NOT PEFT_GLOO_INCLUDE_DIR)
        set(_peft_c10d_why "the Gloo headers are missing (Debian: apt-get install libgloo-dev)")
      else()
        include(CheckCXXSourceCompiles)
        include(CMakePushCheckState)
        cmake_push_check_state(RESET)
        set(CMAKE_REQUIRED_QUIET ON)
        # Plain paths, not the torch target: its link interface names targets (protobuf, ...)
        # that a try_compile project does not have.
        get_filename_component(_peft_torch_libdir "${TORCH_LIBRARY}" DIRECTORY)
        set(CMAKE_REQUIRED_INCLUDES ${TORCH_INCLUDE_DIRS} ${PEFT_GLOO_INCLUDE_DIR})
        set(CMAKE_REQUIRED_DEFINITIONS -DUSE_C10D_GLOO=1)
        set(CMAKE_REQUIRED_LIBRARIES "${_peft_torch_libdir}/libtorch_cpu.so"
          "${_peft_torch_libdir}/libc10.so")
        set(CMAKE_REQUIRED_LINK_OPTIONS "-Wl,-rpath-link,${_peft_torch_libdir}")
        if(Torch_VERSION VERSION_GREATER_EQUAL 2.12)
          set(CMAKE_REQUIRED_FLAGS -std=c++20)
        else()
          set(CMAKE_REQUIRED_FLAGS -std=c++17)
        endif()
        message(STATUS "[peft] probing c10d and Gloo for data-parallel training")
        check_cxx_source_compiles([=[
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
int main() {
  c10d::TCPStoreOptions o;
  o.port = 1;
  o.numWorkers = 2;
  auto opts = c10d::ProcessGroupGloo::Options::create();
  opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto store = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", o);
  c10::intrusive_ptr<c10d::Backend> pg =
      c10::make_intrusive<c10d::ProcessGroupGloo>(store, 0, 2, opts);
  return pg ? 0 : 1;
}]=] PEFT_C10D_PROBE)
        cmake_pop_check_state()
        if(NOT PEFT_C10D_PROBE)
          set(_peft_c10d_why "c10d with the Gloo headers in ${PEFT_GLOO_INCLUDE_DIR} did not compile or link with LibTorch ${Torch_VERSION} (see CMakeFiles/CMakeError.log or CMakeConfigureLog.yaml)")
        endif()
      endif()
      if(_peft_c10d_why STREQUAL "")
        set(PEFT_C10D_OK ON CACHE INTERNAL "c10d and Gloo usable")
      else()
        set(PEFT_C10D_OK OFF CACHE INTERNAL "c10d and Gloo usable")
        set(PEFT_C10D_WHY "${_peft_c10d_why}" CACHE INTERNAL "why c10d is unusable")
      endif()
    endif()
    if(PEFT_C10D_OK)
      set_target_properties(peft::distributed PROPERTIES
        INTERFACE_COMPILE_DEFINITIONS "PEFT_WITH_C10D=1;USE_C10D_GLOO=1"
        INTERFACE_INCLUDE_DIRECTORIES "${PEFT_GLOO_INCLUDE_DIR}")
      message(STATUS "[peft] data-parallel training: c10d with Gloo (headers ${PEFT_GLOO_INCLUDE_DIR})")
    else()
      set_target_properties(peft::distributed PROPERTIES
        INTERFACE_COMPILE_DEFINITIONS "PEFT_C10D_MISSING=\"${PEFT_C10D_WHY}\"")
      message(STATUS "[peft] data-parallel training unavailable: ${PEFT_C10D_WHY}")
    endif()
  endif()
endmacro()
