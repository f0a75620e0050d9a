# Runs one example program for CTest and checks how it ended, which PASS_REGULAR_EXPRESSION
# alone cannot (it ignores the exit status).
#
#   cmake -DARGS=<program>|<arg>|... [-DLAST=<regex>] [-DSTDOUT=<regex>] [-DFAIL=<regex>]
#         [-DOUTDIR=<folder> -DFILES=<name>|<name>...] -P check_run.cmake
#
# Arguments are separated by '|' (a ';' would be split by add_test). Without FAIL the program
# must exit with 0, print nothing on stderr, and its last stdout line must match LAST; STDOUT
# must match somewhere in stdout; each of FILES must exist in OUTDIR. With FAIL the program must
# exit non-zero with stderr matching FAIL and no crash or stack trace.
string(REPLACE "|" ";" command "${ARGS}")
execute_process(COMMAND ${command} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}")
if(err)
  message("stderr:\n${err}")
endif()

if(DEFINED FAIL)
  if(rc EQUAL 0)
    message(FATAL_ERROR "expected a non-zero exit status, got 0")
  endif()
  if(NOT err MATCHES "${FAIL}")
    message(FATAL_ERROR "stderr does not match \"${FAIL}\"")
  endif()
  if(err MATCHES "terminate called|Exception raised from|frame #|Segmentation|Aborted")
    message(FATAL_ERROR "the program crashed or printed a stack trace")
  endif()
  return()
endif()

if(NOT rc EQUAL 0)
  message(FATAL_ERROR "exit status ${rc}")
endif()
if(err)
  message(FATAL_ERROR "unexpected output on stderr")
endif()
string(STRIP "${out}" stripped)
string(REGEX REPLACE ".*\n" "" last "${stripped}")
if(DEFINED LAST AND NOT last MATCHES "${LAST}")
  message(FATAL_ERROR "last line\n  ${last}\ndoes not match\n  ${LAST}")
endif()
if(DEFINED STDOUT AND NOT out MATCHES "${STDOUT}")
  message(FATAL_ERROR "stdout does not match \"${STDOUT}\"")
endif()
if(DEFINED FILES)
  string(REPLACE "|" ";" files "${FILES}")
  foreach(f IN LISTS files)
    if(NOT EXISTS "${OUTDIR}/${f}")
      message(FATAL_ERROR "${OUTDIR}/${f} was not written")
    endif()
  endforeach()
endif()
