/* dadi._fastfs: the node daemon's native read path for read-only views.
 *
 * Why: every read of a view through the Python FUSE file system costs a pyfuse3 + trio round trip
 * (about 90 us through a loop device even for a handler that returns at once, measured 2026-11-24),
 * which made reading a whole prefetched image 2.5x slower than the same disk on a plain loop device.
 *
 * What: a second FUSE file system, served by libfuse's multi-threaded loop in C threads that never take
 * the GIL. It holds one file per registered view, the view's disk. A read is answered from the node's
 * chunk cache: merged index -> chunks -> pread of the stored bytes from the blob's cache file -> xxh3
 * check against the chunk table -> lz4 -> reply. Anything else (a chunk not local yet, a damaged one, a
 * chunk whose bytes are being written) makes the whole read a "fallback": the range is asked of the
 * daemon's Python side over a unix socket, where the view's Python read path fetches, re-checks with
 * sha256, stores, counts and enforces the read's deadline as before (EIO on failure). So correctness
 * stays with the Python path, and this path only ever serves bytes that pass the same xxh3 check the
 * Python path's cache reads use.
 *
 * Why a socket and not a read of the view's file on the Python FUSE file system: a thread of this
 * process waiting on a FUSE request that this same process has read cannot be killed, so a SIGKILLed
 * daemon would never finish dying and both file systems would hang their readers forever. A socket wait
 * dies with the process, and has a timeout of its own.
 *
 * Fallback protocol (native byte order; requests follow each other on a connection, one at a time):
 *   request:  u32 name length, u32 length, u64 offset, the view's name
 *   response: i32 errno (0: success), u32 length, then that many bytes
 *
 * The views' tables are copied in at add(), so no Python object is touched by the FUSE threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 34
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <lz4.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#define DIRECT_ALIGN 4096
#define ZERO_LAYER (-1)

typedef struct {
    uint64_t offset;     /* of the stored bytes in the blob (and in the cache's data file) */
    uint32_t length;     /* stored bytes */
    uint32_t raw_length; /* decompressed bytes */
    uint64_t xxh3;       /* of the stored bytes */
    uint8_t compressed;  /* lz4 block, else stored raw */
} chunk_t;

typedef struct {
    int fd; /* the blob's cache data file, read-only */
    uint64_t chunk_size;
    size_t nchunks;
    chunk_t *chunks;
} layer_t;

typedef struct {
    char *name;
    uint64_t serial; /* unique for the life of the process: the decoded-chunk cache's key */
    uint64_t ino;
    uint64_t disk_size;
    uint64_t block_size;
    size_t nseg;
    uint64_t *starts, *ends; /* blocks, [start, end) */
    int64_t *layers;         /* index into lay, or ZERO_LAYER */
    int64_t *offsets;        /* packed-stream byte offset of the segment's first block */
    size_t nlayers;
    layer_t *lay;
    size_t scratch; /* the largest stored or raw chunk: per-read buffer size */
    struct sockaddr_un fallback; /* the daemon's socket for reads this path cannot answer */
    int fallback_timeout;        /* seconds: the view's io timeout and some slack; the daemon answers sooner */
    atomic_ullong reads, bytes, fallbacks, errors, chunks;
    atomic_int users; /* reads in flight */
    atomic_int complete; /* every chunk is cached (the daemon says so): no hole check before decoding */
} view_t;

typedef struct {
    PyObject_HEAD
    struct fuse_session *se;
    pthread_t thread;
    int running;
    char *mountpoint;
    pthread_rwlock_t lock; /* guards views/nviews */
    view_t **views;
    size_t nviews;
    struct timespec created;
} ServerObject;

static void view_free(view_t *v)
{
    if (!v)
        return;
    for (size_t i = 0; i < v->nlayers; i++) {
        if (v->lay[i].fd >= 0)
            close(v->lay[i].fd);
        free(v->lay[i].chunks);
    }
    free(v->lay);
    free(v->starts);
    free(v->ends);
    free(v->layers);
    free(v->offsets);
    free(v->name);
    free(v);
}

/* A view in use by the caller (users incremented), or NULL. */
static view_t *view_get(ServerObject *s, fuse_ino_t ino)
{
    view_t *found = NULL;
    pthread_rwlock_rdlock(&s->lock);
    for (size_t i = 0; i < s->nviews; i++) {
        if (s->views[i]->ino == ino) {
            found = s->views[i];
            atomic_fetch_add(&found->users, 1);
            break;
        }
    }
    pthread_rwlock_unlock(&s->lock);
    return found;
}

static void view_put(view_t *v) { atomic_fetch_sub(&v->users, 1); }

/* ---- per-thread buffers ---------------------------------------------------------------------- */

/* Each FUSE thread keeps its buffers between reads: a fresh 1 MiB buffer per read is an mmap and 256
 * page faults, which cost more system time than the read itself. */
typedef struct {
    char *out; /* the reply */
    size_t out_cap;
    char *stored, *raw; /* one chunk's stored and decoded bytes */
    size_t scratch_cap;
    int conn; /* to the fallback socket, kept between reads; -1: none */
    char conn_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
} buffers_t;

static pthread_key_t buffers_key;

static void buffers_free(void *p)
{
    buffers_t *b = p;
    if (b->conn >= 0)
        close(b->conn);
    free(b->out);
    free(b->stored);
    free(b->raw);
    free(b);
}

static buffers_t *buffers_get(size_t out, size_t scratch)
{
    buffers_t *b = pthread_getspecific(buffers_key);
    if (!b) {
        b = calloc(1, sizeof(*b));
        if (!b || pthread_setspecific(buffers_key, b) != 0) {
            free(b);
            return NULL;
        }
        b->conn = -1;
    }
    if (b->out_cap < out) {
        free(b->out);
        b->out = NULL;
        b->out_cap = 0;
        if (posix_memalign((void **)&b->out, DIRECT_ALIGN, out) != 0)
            return NULL;
        b->out_cap = out;
    }
    if (b->scratch_cap < scratch) {
        free(b->stored);
        free(b->raw);
        b->stored = malloc(scratch);
        b->raw = malloc(scratch);
        b->scratch_cap = b->stored && b->raw ? scratch : 0;
        if (!b->scratch_cap)
            return NULL;
    }
    return b;
}

/* ---- decoded chunks shared by all threads ---------------------------------------------------- */

/* Small files sit side by side in one chunk, and reading a tree reads them one after the other: without
 * this every 4 KiB read would pread, hash and decode its whole chunk again. Direct-mapped, one lock per
 * slot; only chunks whose xxh3 matched get here, and a chunk's bytes never change. */
#define DECODED_SLOTS 256
#define DECODED_MAX (1u << 20) /* larger chunks are not kept */

typedef struct {
    pthread_mutex_t lock;
    uint64_t serial; /* the view's; 0: empty */
    uint64_t layer, index;
    uint32_t length;
    uint32_t capacity; /* of raw: grown to the largest chunk the slot held */
    char *raw;
} decoded_t;

static decoded_t decoded[DECODED_SLOTS];
static atomic_ullong next_serial = 1;

static decoded_t *decoded_slot(uint64_t serial, uint64_t layer, uint64_t index)
{
    uint64_t h = (serial * 0x9E3779B97F4A7C15ull) ^ (layer * 0xC2B2AE3D27D4EB4Full) ^ (index * 0x165667B19E3779F9ull);
    return &decoded[(h ^ (h >> 29)) % DECODED_SLOTS];
}

/* Copy bytes [within, within + n) of a decoded chunk into dst if the cache has it. */
static int decoded_get(uint64_t serial, uint64_t layer, uint64_t index, uint64_t within, char *dst, uint64_t n)
{
    decoded_t *d = decoded_slot(serial, layer, index);
    int hit = 0;
    pthread_mutex_lock(&d->lock);
    if (d->serial == serial && d->layer == layer && d->index == index && within + n <= d->length) {
        memcpy(dst, d->raw + within, n);
        hit = 1;
    }
    pthread_mutex_unlock(&d->lock);
    return hit;
}

static void decoded_put(uint64_t serial, uint64_t layer, uint64_t index, const char *raw, uint32_t length)
{
    if (length > DECODED_MAX)
        return;
    decoded_t *d = decoded_slot(serial, layer, index);
    pthread_mutex_lock(&d->lock);
    if (d->capacity < length) {
        free(d->raw);
        d->raw = malloc(length);
        d->capacity = d->raw ? length : 0;
        d->serial = 0; /* the old bytes are gone */
    }
    if (d->raw) {
        memcpy(d->raw, raw, length);
        d->serial = serial;
        d->layer = layer;
        d->index = index;
        d->length = length;
    }
    pthread_mutex_unlock(&d->lock);
}

/* ---- the read path --------------------------------------------------------------------------- */

/* False when the chunk's middle byte is in a hole of the sparse cache file: it was never written. (Its
 * first and last file blocks may hold a neighbour's bytes, its middle one only its own.) */
static int chunk_maybe_cached(const layer_t *layer, const chunk_t *c)
{
    off_t middle = (off_t)(c->offset + c->length / 2);
    off_t data = lseek(layer->fd, middle, SEEK_DATA); /* the fd's offset is not used: reads use pread */
    return data >= 0 && data <= middle;
}

/* Copy packed-stream bytes [packed, packed + len) of a layer into dst; -1 when a chunk is not usable
 * here (not local, damaged, being written): the caller falls back to the Python path. With dst NULL,
 * only check that no chunk is missing from the cache file, which costs a seek per chunk instead of
 * a read, hash and decode. */
static int copy_packed(view_t *v, uint64_t layer_index, uint64_t packed, char *dst, uint64_t len,
                       char *stored, char *raw)
{
    const layer_t *layer = &v->lay[layer_index];
    while (len > 0) {
        uint64_t index = packed / layer->chunk_size;
        uint64_t within = packed % layer->chunk_size;
        if (index >= layer->nchunks)
            return -1;
        const chunk_t *c = &layer->chunks[index];
        if (within >= c->raw_length)
            return -1;
        uint64_t n = c->raw_length - within;
        if (n > len)
            n = len;
        if (!dst) {
            if (!chunk_maybe_cached(layer, c))
                return -1;
            packed += n;
            len -= n;
            continue;
        }
        atomic_fetch_add(&v->chunks, 1);
        if (decoded_get(v->serial, layer_index, index, within, dst, n))
            goto next;
        /* Into a private buffer, so what was checked is what is decoded. A hole (a chunk not cached
         * yet) reads as zeros and fails the check too. */
        ssize_t got = pread(layer->fd, stored, c->length, (off_t)c->offset);
        if (got != (ssize_t)c->length || XXH3_64bits(stored, c->length) != c->xxh3)
            return -1;
        if (!c->compressed) {
            memcpy(dst, stored + within, n);
        } else if (within == 0 && n == c->raw_length) {
            if (LZ4_decompress_safe(stored, dst, (int)c->length, (int)c->raw_length) != (int)c->raw_length)
                return -1;
        } else {
            if (LZ4_decompress_safe(stored, raw, (int)c->length, (int)c->raw_length) != (int)c->raw_length)
                return -1;
            decoded_put(v->serial, layer_index, index, raw, c->raw_length); /* the rest is read next */
            memcpy(dst, raw + within, n);
        }
    next:
        dst += n;
        packed += n;
        len -= n;
    }
    return 0;
}

/* Disk bytes [off, off + len) into dst from local chunks; -1: fall back. With dst NULL, only check that
 * every chunk the range needs may be local (see copy_packed). */
static int read_local(view_t *v, uint64_t off, char *dst, uint64_t len, char *stored, char *raw)
{
    uint64_t bs = v->block_size, pos = off, end = off + len;
    /* first segment that ends after the read's first block */
    size_t lo = 0, hi = v->nseg;
    uint64_t first_block = off / bs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v->ends[mid] <= first_block)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (size_t k = lo; pos < end; k++) {
        if (k >= v->nseg || v->starts[k] * bs >= end) {
            if (dst)
                memset(dst + (pos - off), 0, end - pos); /* a hole: zeros */
            break;
        }
        uint64_t seg_start = v->starts[k] * bs, seg_end = v->ends[k] * bs;
        if (seg_start > pos) {
            if (dst)
                memset(dst + (pos - off), 0, seg_start - pos);
            pos = seg_start;
        }
        uint64_t piece_end = seg_end < end ? seg_end : end;
        int64_t layer = v->layers[k];
        if (layer == ZERO_LAYER) {
            if (dst)
                memset(dst + (pos - off), 0, piece_end - pos);
        } else {
            uint64_t packed = (uint64_t)v->offsets[k] + (pos - seg_start);
            if (layer < 0 || (size_t)layer >= v->nlayers ||
                copy_packed(v, (uint64_t)layer, packed, dst ? dst + (pos - off) : NULL, piece_end - pos, stored,
                            raw) < 0)
                return -1;
        }
        pos = piece_end;
    }
    return 0;
}

static int send_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t sent = send(fd, c, n, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent <= 0)
            return -1;
        c += sent;
        n -= (size_t)sent;
    }
    return 0;
}

static int recv_all(int fd, void *p, size_t n)
{
    char *c = p;
    while (n > 0) {
        ssize_t got = recv(fd, c, n, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        c += got;
        n -= (size_t)got;
    }
    return 0;
}

/* This thread's connection to the fallback socket at `path`, made if needed; -1 if it cannot be. */
static int fallback_connection(buffers_t *b, const struct sockaddr_un *path)
{
    if (b->conn >= 0 && strcmp(b->conn_path, path->sun_path) == 0)
        return b->conn;
    if (b->conn >= 0)
        close(b->conn);
    b->conn = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (b->conn >= 0 && connect(b->conn, (const struct sockaddr *)path, sizeof(*path)) != 0) {
        close(b->conn);
        b->conn = -1;
    }
    if (b->conn >= 0)
        strcpy(b->conn_path, path->sun_path);
    return b->conn;
}

static void fallback_disconnect(buffers_t *b)
{
    if (b->conn >= 0)
        close(b->conn);
    b->conn = -1;
}

/* The whole read through the daemon's Python read path: fetches what is missing, under the read's
 * deadline. The bytes read, or -errno; EIO when the daemon is gone or does not answer in time. Each
 * thread keeps its connection: a connection per read cost the daemon about 0.5 ms of CPU per read. */
static ssize_t read_fallback(view_t *v, uint64_t off, char *dst, uint64_t len, buffers_t *b)
{
    uint32_t name_len = (uint32_t)strlen(v->name);
    struct {
        uint32_t name_len, length;
        uint64_t offset;
    } request = {name_len, (uint32_t)len, off};
    struct {
        int32_t err;
        uint32_t length;
    } response;
    struct timeval timeout = {.tv_sec = v->fallback_timeout};
    for (int attempt = 0;; attempt++) {
        int fd = fallback_connection(b, &v->fallback);
        if (fd < 0)
            return -EIO;
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
        if (send_all(fd, &request, sizeof(request)) == 0 && send_all(fd, v->name, name_len) == 0)
            break;
        fallback_disconnect(b); /* the daemon closed a kept connection: one new one */
        if (attempt > 0)
            return -EIO;
    }
    if (recv_all(b->conn, &response, sizeof(response)) != 0) {
        fallback_disconnect(b);
        return -EIO;
    }
    if (response.err != 0)
        return response.err > 0 ? -response.err : -EIO;
    if (response.length > len || recv_all(b->conn, dst, response.length) != 0) {
        fallback_disconnect(b);
        return -EIO;
    }
    return (ssize_t)response.length;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)fi;
    ServerObject *s = fuse_req_userdata(req);
    view_t *v = view_get(s, ino);
    if (!v) {
        fuse_reply_err(req, EBADF);
        return;
    }
    uint64_t len = size;
    if ((uint64_t)off >= v->disk_size)
        len = 0;
    else if ((uint64_t)off + len > v->disk_size)
        len = v->disk_size - (uint64_t)off;
    buffers_t *b = buffers_get(len ? len : 1, v->scratch);
    if (!b) {
        view_put(v);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    char *buf = b->out;
    atomic_fetch_add(&v->reads, 1);
    ssize_t n = (ssize_t)len;
    /* Until the daemon says every chunk is cached, a read that will fall back anyway is found by its holes
     * first, instead of decoding the chunks before the first missing one only to throw them away (on the
     * node benchmark's start from a local layout: 490 chunk decodes for 392 reads before, 150 after). */
    int local = len && (atomic_load(&v->complete) || read_local(v, (uint64_t)off, NULL, len, NULL, NULL) == 0) &&
                read_local(v, (uint64_t)off, buf, len, b->stored, b->raw) == 0;
    if (len && !local) {
        atomic_fetch_add(&v->fallbacks, 1);
        n = read_fallback(v, (uint64_t)off, buf, len, b);
    }
    if (n < 0) {
        atomic_fetch_add(&v->errors, 1);
        fuse_reply_err(req, (int)-n);
    } else {
        atomic_fetch_add(&v->bytes, (unsigned long long)n);
        fuse_reply_buf(req, buf, (size_t)n);
    }
    view_put(v);
}

/* ---- the namespace: a root directory with one read-only file per view ------------------------- */

static void fill_attr(ServerObject *s, struct stat *st, fuse_ino_t ino, const view_t *v)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_uid = getuid();
    st->st_gid = getgid();
    st->st_atim = st->st_mtim = st->st_ctim = s->created;
    st->st_blksize = 4096;
    if (!v) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0400;
        st->st_nlink = 1;
        st->st_size = (off_t)v->disk_size;
        st->st_blocks = (blkcnt_t)(v->disk_size / 512);
    }
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)fi;
    ServerObject *s = fuse_req_userdata(req);
    struct stat st;
    if (ino == FUSE_ROOT_ID) {
        fill_attr(s, &st, ino, NULL);
        fuse_reply_attr(req, &st, 1.0);
        return;
    }
    view_t *v = view_get(s, ino);
    if (!v) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill_attr(s, &st, ino, v);
    view_put(v);
    fuse_reply_attr(req, &st, 1.0);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    ServerObject *s = fuse_req_userdata(req);
    struct fuse_entry_param e;
    memset(&e, 0, sizeof(e));
    if (parent != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    pthread_rwlock_rdlock(&s->lock);
    for (size_t i = 0; i < s->nviews; i++) {
        if (strcmp(s->views[i]->name, name) == 0) {
            e.ino = s->views[i]->ino;
            fill_attr(s, &e.attr, e.ino, s->views[i]);
            break;
        }
    }
    pthread_rwlock_unlock(&s->lock);
    if (!e.ino) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    e.attr_timeout = e.entry_timeout = 1.0;
    fuse_reply_entry(req, &e);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    ServerObject *s = fuse_req_userdata(req);
    if ((fi->flags & O_ACCMODE) != O_RDONLY) {
        fuse_reply_err(req, EROFS);
        return;
    }
    view_t *v = view_get(s, ino);
    if (!v) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    view_put(v);
    fi->keep_cache = 1; /* the disk never changes under this file */
    fuse_reply_open(req, fi);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)fi;
    ServerObject *s = fuse_req_userdata(req);
    if (ino != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    char *buf = calloc(1, size);
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    size_t used = 0;
    pthread_rwlock_rdlock(&s->lock);
    for (size_t i = (size_t)off; i < s->nviews; i++) {
        struct stat st;
        fill_attr(s, &st, s->views[i]->ino, s->views[i]);
        size_t need = fuse_add_direntry(req, buf + used, size - used, s->views[i]->name, &st, (off_t)(i + 1));
        if (need > size - used)
            break;
        used += need;
    }
    pthread_rwlock_unlock(&s->lock);
    fuse_reply_buf(req, buf, used);
    free(buf);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    (void)ino;
    struct statvfs st;
    memset(&st, 0, sizeof(st));
    st.f_bsize = st.f_frsize = 4096;
    st.f_namemax = 255;
    fuse_reply_statfs(req, &st);
}

static const struct fuse_lowlevel_ops fast_ops = {
    .lookup = op_lookup,
    .getattr = op_getattr,
    .open = op_open,
    .read = op_read,
    .readdir = op_readdir,
    .statfs = op_statfs,
};

static void *loop_main(void *arg)
{
    ServerObject *s = arg;
    struct fuse_loop_config *config = fuse_loop_cfg_create();
    /* Up to 8 threads, so that reads waiting on the Python path (the network) do not hold up local ones;
     * only 2 kept idle. Measured on the node benchmark's warm tree read (2026-11-24, medians of 3, two
     * rounds each): 2 idle of 8 gave 0.83-0.86x a plain loop device, 8 idle 0.68-0.73x, 2 of 2 0.67-0.73x. */
    fuse_loop_cfg_set_max_threads(config, 8);
    fuse_loop_cfg_set_idle_threads(config, 2);
    fuse_session_loop_mt(s->se, config);
    fuse_loop_cfg_destroy(config);
    return NULL;
}

/* ---- the Python object ----------------------------------------------------------------------- */

static int Server_init(ServerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mountpoint", NULL};
    const char *mountpoint;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s", kwlist, &mountpoint))
        return -1;
    if (self->se) {
        PyErr_SetString(PyExc_RuntimeError, "Server is already mounted");
        return -1;
    }
    pthread_rwlock_init(&self->lock, NULL);
    clock_gettime(CLOCK_REALTIME, &self->created);
    char *argv[] = {"dadi-native", "-o", "allow_other,fsname=dadi-native,subtype=dadi", NULL};
    struct fuse_args fargs = FUSE_ARGS_INIT(3, argv);
    self->se = fuse_session_new(&fargs, &fast_ops, sizeof(fast_ops), self);
    fuse_opt_free_args(&fargs);
    if (!self->se) {
        PyErr_SetString(PyExc_OSError, "fuse_session_new failed (see stderr)");
        return -1;
    }
    if (fuse_session_mount(self->se, mountpoint) != 0) {
        fuse_session_destroy(self->se);
        self->se = NULL;
        PyErr_Format(PyExc_OSError, "cannot mount the native file system at %s", mountpoint);
        return -1;
    }
    self->mountpoint = strdup(mountpoint);
    /* The loop's threads (and the workers it starts) block every signal: the daemon's signals belong to
     * its Python thread, and a read of /dev/fuse need not be interrupted. */
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &previous);
    int started = pthread_create(&self->thread, NULL, loop_main, self);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (started != 0) {
        fuse_session_unmount(self->se);
        fuse_session_destroy(self->se);
        self->se = NULL;
        PyErr_SetString(PyExc_OSError, "cannot start the native file system's thread");
        return -1;
    }
    self->running = 1;
    return 0;
}

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, Py_ssize_t count, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", what, view->len, itemsize * count);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static void *copy_out(Py_buffer *b)
{
    void *p = malloc(b->len ? (size_t)b->len : 1);
    if (p)
        memcpy(p, b->buf, (size_t)b->len);
    return p;
}

/* add(name, ino, disk_size, block_size, starts, ends, layers, offsets, layer_list, fallback_socket,
 *     fallback_timeout)
 * starts/ends: uint64 buffers; layers/offsets: int64 buffers (one entry per merged segment);
 * layer_list: [(cache_data_path, chunk_size, offsets u64, lengths u32, raw_lengths u32, xxh3 u64,
 * compressed u8)], one per layer, bottom first. */
static PyObject *Server_add(ServerObject *self, PyObject *args)
{
    const char *name, *fallback;
    unsigned long long ino, disk_size, block_size;
    int fallback_timeout;
    PyObject *o_starts, *o_ends, *o_layers, *o_offsets, *layer_list;
    if (!PyArg_ParseTuple(args, "sKKKOOOOO!si", &name, &ino, &disk_size, &block_size, &o_starts, &o_ends,
                          &o_layers, &o_offsets, &PyList_Type, &layer_list, &fallback, &fallback_timeout))
        return NULL;
    if (strlen(fallback) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        PyErr_Format(PyExc_ValueError, "socket path too long: %s", fallback);
        return NULL;
    }
    if (fallback_timeout <= 0) {
        PyErr_SetString(PyExc_ValueError, "fallback_timeout must be positive");
        return NULL;
    }
    if (!self->se) {
        PyErr_SetString(PyExc_RuntimeError, "the native file system is closed");
        return NULL;
    }
    if (block_size == 0) {
        PyErr_SetString(PyExc_ValueError, "block_size must be positive");
        return NULL;
    }
    const char **paths = NULL; /* each layer's cache data file, owned by the arguments */
    view_t *v = calloc(1, sizeof(view_t));
    if (!v)
        return PyErr_NoMemory();
    v->fallback.sun_family = AF_UNIX;
    strcpy(v->fallback.sun_path, fallback);
    v->fallback_timeout = fallback_timeout;
    v->serial = atomic_fetch_add(&next_serial, 1);
    v->name = strdup(name);
    v->ino = ino;
    v->disk_size = disk_size;
    v->block_size = block_size;
    Py_ssize_t nseg = PyObject_Length(o_starts);
    if (nseg < 0)
        goto fail;
    v->nseg = (size_t)nseg;
    Py_buffer b;
    PyObject *seg_objs[4] = {o_starts, o_ends, o_layers, o_offsets};
    void **seg_dst[4] = {(void **)&v->starts, (void **)&v->ends, (void **)&v->layers, (void **)&v->offsets};
    for (int i = 0; i < 4; i++) {
        if (get_buffer(seg_objs[i], &b, 8, nseg, "segment array") < 0)
            goto fail;
        *seg_dst[i] = copy_out(&b);
        PyBuffer_Release(&b);
        if (!*seg_dst[i]) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    v->nlayers = (size_t)PyList_GET_SIZE(layer_list);
    v->lay = calloc(v->nlayers ? v->nlayers : 1, sizeof(layer_t));
    if (!v->lay) {
        PyErr_NoMemory();
        goto fail;
    }
    for (size_t i = 0; i < v->nlayers; i++)
        v->lay[i].fd = -1;
    paths = calloc(v->nlayers ? v->nlayers : 1, sizeof(char *));
    if (!paths) {
        PyErr_NoMemory();
        goto fail;
    }
    for (size_t i = 0; i < v->nlayers; i++) {
        const char *path;
        unsigned long long chunk_size;
        PyObject *bufs[5];
        if (!PyArg_ParseTuple(PyList_GET_ITEM(layer_list, i), "sKOOOOO", &path, &chunk_size, &bufs[0], &bufs[1],
                              &bufs[2], &bufs[3], &bufs[4]))
            goto fail;
        layer_t *layer = &v->lay[i];
        if (chunk_size == 0) {
            PyErr_SetString(PyExc_ValueError, "chunk_size must be positive");
            goto fail;
        }
        layer->chunk_size = chunk_size;
        Py_ssize_t n = PyObject_Length(bufs[4]);
        if (n < 0)
            goto fail;
        layer->nchunks = (size_t)n;
        layer->chunks = calloc(n ? (size_t)n : 1, sizeof(chunk_t));
        if (!layer->chunks) {
            PyErr_NoMemory();
            goto fail;
        }
        Py_buffer cb[5];
        const Py_ssize_t sizes[5] = {8, 4, 4, 8, 1};
        int got = 0;
        for (; got < 5; got++)
            if (get_buffer(bufs[got], &cb[got], sizes[got], n, "chunk table column") < 0)
                break;
        if (got == 5) {
            for (Py_ssize_t k = 0; k < n; k++) {
                chunk_t *c = &layer->chunks[k];
                c->offset = ((uint64_t *)cb[0].buf)[k];
                c->length = ((uint32_t *)cb[1].buf)[k];
                c->raw_length = ((uint32_t *)cb[2].buf)[k];
                c->xxh3 = ((uint64_t *)cb[3].buf)[k];
                c->compressed = ((uint8_t *)cb[4].buf)[k];
                size_t biggest = c->length > c->raw_length ? c->length : c->raw_length;
                if (biggest > v->scratch)
                    v->scratch = biggest;
            }
        }
        for (int k = 0; k < got; k++)
            PyBuffer_Release(&cb[k]);
        if (got < 5)
            goto fail;
        paths[i] = path;
    }
    if (v->scratch == 0)
        v->scratch = 1;
    const char *failed = NULL;
    int open_errno = 0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < v->nlayers && !failed; i++) {
        v->lay[i].fd = open(paths[i], O_RDONLY | O_CLOEXEC);
        if (v->lay[i].fd < 0)
            failed = paths[i], open_errno = errno;
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        errno = open_errno;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, failed);
        goto fail;
    }
    pthread_rwlock_wrlock(&self->lock);
    for (size_t i = 0; i < self->nviews; i++) {
        if (self->views[i]->ino == ino || strcmp(self->views[i]->name, name) == 0) {
            pthread_rwlock_unlock(&self->lock);
            PyErr_Format(PyExc_ValueError, "view %s is served already", name);
            goto fail;
        }
    }
    view_t **grown = realloc(self->views, (self->nviews + 1) * sizeof(view_t *));
    if (!grown) {
        pthread_rwlock_unlock(&self->lock);
        PyErr_NoMemory();
        goto fail;
    }
    self->views = grown;
    self->views[self->nviews++] = v;
    pthread_rwlock_unlock(&self->lock);
    free(paths);
    Py_RETURN_NONE;
fail:
    free(paths);
    view_free(v);
    return NULL;
}

static view_t *take_view(ServerObject *self, const char *name)
{
    view_t *v = NULL;
    pthread_rwlock_wrlock(&self->lock);
    for (size_t i = 0; i < self->nviews; i++) {
        if (strcmp(self->views[i]->name, name) == 0) {
            v = self->views[i];
            self->views[i] = self->views[--self->nviews];
            break;
        }
    }
    pthread_rwlock_unlock(&self->lock);
    return v;
}

/* remove(name) -> the view's final stats; waits for its reads in flight (a fallback read waits on the
 * daemon's Python side, so the GIL is released while waiting). */
static PyObject *view_stats(view_t *v);

static PyObject *Server_remove(ServerObject *self, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    view_t *v = take_view(self, name);
    if (!v) {
        PyErr_Format(PyExc_KeyError, "%s", name);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    while (atomic_load(&v->users) > 0)
        usleep(1000);
    Py_END_ALLOW_THREADS
    PyObject *stats = view_stats(v);
    view_free(v);
    return stats;
}

static PyObject *view_stats(view_t *v)
{
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K}", "reads", (unsigned long long)atomic_load(&v->reads),
                         "bytes", (unsigned long long)atomic_load(&v->bytes), "fallbacks",
                         (unsigned long long)atomic_load(&v->fallbacks), "errors",
                         (unsigned long long)atomic_load(&v->errors), "chunks",
                         (unsigned long long)atomic_load(&v->chunks));
}

static PyObject *Server_stats(ServerObject *self, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    PyObject *result = NULL;
    pthread_rwlock_rdlock(&self->lock);
    for (size_t i = 0; i < self->nviews; i++)
        if (strcmp(self->views[i]->name, name) == 0)
            result = view_stats(self->views[i]);
    pthread_rwlock_unlock(&self->lock);
    if (!result && !PyErr_Occurred())
        PyErr_Format(PyExc_KeyError, "%s", name);
    return result;
}

static void server_close(ServerObject *self)
{
    if (!self->se)
        return;
    fuse_session_exit(self->se);
    /* Unmounting ends the connection once nothing holds the file system, which wakes the loop's threads
     * (their reads of /dev/fuse fail with ENODEV). A loop device still attached would keep it alive: then
     * the threads are left behind rather than waited for forever. */
    fuse_session_unmount(self->se);
    if (self->running) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 200 * 1000 * 1000;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec += 1;
            until.tv_nsec -= 1000000000L;
        }
        if (pthread_timedjoin_np(self->thread, NULL, &until) == 0)
            fuse_session_destroy(self->se);
        self->running = 0;
    } else {
        fuse_session_destroy(self->se);
    }
    self->se = NULL;
    pthread_rwlock_wrlock(&self->lock);
    for (size_t i = 0; i < self->nviews; i++)
        if (atomic_load(&self->views[i]->users) == 0)
            view_free(self->views[i]);
    free(self->views);
    self->views = NULL;
    self->nviews = 0;
    pthread_rwlock_unlock(&self->lock);
    free(self->mountpoint);
    self->mountpoint = NULL;
}

static PyObject *Server_close(ServerObject *self, PyObject *Py_UNUSED(ignored))
{
    Py_BEGIN_ALLOW_THREADS
    server_close(self);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void Server_dealloc(ServerObject *self)
{
    Py_BEGIN_ALLOW_THREADS
    server_close(self);
    Py_END_ALLOW_THREADS
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Server_set_complete(ServerObject *self, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    int found = 0;
    pthread_rwlock_rdlock(&self->lock);
    for (size_t i = 0; i < self->nviews; i++) {
        if (strcmp(self->views[i]->name, name) == 0) {
            atomic_store(&self->views[i]->complete, 1);
            found = 1;
        }
    }
    pthread_rwlock_unlock(&self->lock);
    if (!found) {
        PyErr_Format(PyExc_KeyError, "%s", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Server_methods[] = {
    {"set_complete", (PyCFunction)Server_set_complete, METH_VARARGS,
     "set_complete(name): every chunk of the view is cached; reads skip the hole check"},
    {"add", (PyCFunction)Server_add, METH_VARARGS,
     "add(name, ino, disk_size, block_size, starts, ends, layers, offsets, layers_list, fallback_socket, "
     "fallback_timeout)"},
    {"remove", (PyCFunction)Server_remove, METH_VARARGS, "remove(name) -> the view's final stats"},
    {"stats", (PyCFunction)Server_stats, METH_VARARGS, "stats(name) -> reads, bytes, fallbacks, errors, chunks"},
    {"close", (PyCFunction)Server_close, METH_NOARGS, "unmount and stop the threads"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ServerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dadi._fastfs.Server",
    .tp_basicsize = sizeof(ServerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A FUSE file system of read-only view disks served from the chunk cache by C threads.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Server_init,
    .tp_dealloc = (destructor)Server_dealloc,
    .tp_methods = Server_methods,
};

static struct PyModuleDef fastfs_module = {
    PyModuleDef_HEAD_INIT, .m_name = "dadi._fastfs",
    .m_doc = "The node daemon's native read path for read-only views (see native/dadi_fastfs.c).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fastfs(void)
{
    if (PyType_Ready(&ServerType) < 0)
        return NULL;
    if (pthread_key_create(&buffers_key, buffers_free) != 0)
        return PyErr_NoMemory();
    for (int i = 0; i < DECODED_SLOTS; i++)
        pthread_mutex_init(&decoded[i].lock, NULL);
    PyObject *m = PyModule_Create(&fastfs_module);
    if (!m)
        return NULL;
    Py_INCREF(&ServerType);
    if (PyModule_AddObject(m, "Server", (PyObject *)&ServerType) < 0) {
        Py_DECREF(&ServerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
