/*
 * cloudlet-logcap MAX_BYTES: copies its standard input to its standard output, a log file, and keeps that file at
 * most MAX_BYTES long: when a write would pass the cap it keeps the newest half, behind a marker line. A sandbox's
 * output goes through it, so an app that floods stdout cannot fill the disk; it runs as the sandbox user and lives
 * as long as the sandbox does (it ends when the last writer closes the pipe).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHUNK 65536
static const char MARKER[] = "[cloudlet: older output dropped, the log is capped]\n";

/* Writes at an offset: the log is rewritten in place when it shrinks, so a reader never finds it empty. */
static int write_at(const char *buf, size_t len, off_t at) {
  while (len > 0) {
    ssize_t n = pwrite(STDOUT_FILENO, buf, len, at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return -1;
    buf += n;
    len -= (size_t)n;
    at += n;
  }
  return 0;
}

/*
 * Keep the newest `keep` bytes of the file (size `size`) at its start, behind the marker; returns the new size. The
 * head is overwritten first and the file cut after it, so a reader sees the old log or the new one, never an empty file.
 */
static off_t shrink(off_t size, off_t keep, char *tail) {
  ssize_t got = pread(STDOUT_FILENO, tail, (size_t)keep, size - keep);
  if (got < 0) got = 0;
  off_t marker = (off_t)(sizeof MARKER - 1);
  if (write_at(MARKER, (size_t)marker, 0) != 0 || write_at(tail, (size_t)got, marker) != 0) return -1;
  if (ftruncate(STDOUT_FILENO, marker + got) != 0) return -1;
  return marker + got;
}

int main(int argc, char **argv) {
  char *end = NULL;
  long long max = argc == 2 ? strtoll(argv[1], &end, 10) : 0;
  if (argc != 2 || *end != '\0' || max < 4 * CHUNK) {
    fprintf(stderr, "usage: cloudlet-logcap MAX_BYTES (at least %d)\n", 4 * CHUNK);
    return 2;
  }
  struct stat st;
  if (fstat(STDOUT_FILENO, &st) != 0 || !S_ISREG(st.st_mode)) {
    fprintf(stderr, "cloudlet-logcap: standard output must be a regular file\n");
    return 2;
  }
  /* pwrite on an O_APPEND file appends on Linux whatever the offset: this process is the file's only writer. */
  int flags = fcntl(STDOUT_FILENO, F_GETFL);
  if (flags < 0 || fcntl(STDOUT_FILENO, F_SETFL, flags & ~O_APPEND) != 0) {
    perror("cloudlet-logcap: fcntl");
    return 1;
  }
  off_t keep = (off_t)(max / 2);
  char *tail = malloc((size_t)keep);
  static char buf[CHUNK];
  if (!tail) return 1;
  off_t size = st.st_size;
  for (;;) {
    ssize_t n = read(STDIN_FILENO, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n == 0 ? 0 : 1;
    if (size + n > max) {
      off_t kept = size < keep ? size : keep;
      size = shrink(size, kept, tail);
      if (size < 0) return 1;
    }
    if (write_at(buf, (size_t)n, size) != 0) return 1;
    size += n;
  }
}
