# Fails when a Catch2 TEST_CASE name contains ';'. catch_discover_tests() splits such a name into
# several CTest entries that each match no test case, and Catch2 v2 passes a run that matched
# nothing: the test would silently stop running.
#   cmake -DSOURCES=a.cpp;b.cpp -P check_test_names.cmake
set(bad "")
set(count 0)
foreach(source IN LISTS SOURCES)
  file(READ "${source}" text)
  # ';' is CMake's list separator: hide it before matching, then look for the stand-in.
  string(REPLACE ";" "<SEMICOLON>" text "${text}")
  string(REGEX MATCHALL "TEST_CASE\\(\"([^\"\\\\]|\\\\.)*\"" names "${text}")
  foreach(name IN LISTS names)
    math(EXPR count "${count} + 1")
    if(name MATCHES "<SEMICOLON>")
      list(APPEND bad "${source}: ${name}")
    endif()
  endforeach()
endforeach()
if(bad)
  list(JOIN bad "\n  " lines)
  string(REPLACE "<SEMICOLON>" ";" lines "${lines}")
  message(FATAL_ERROR "test names must not contain ';' (CTest would split them):\n  ${lines}")
endif()
message(STATUS "checked ${count} test names")
