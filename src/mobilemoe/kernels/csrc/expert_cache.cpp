// ExpertCache (expert_cache.h).
#include "expert_cache.h"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

namespace mobilemoe_cache {

ExpertCache::ExpertCache(const std::string& path, bool drop_page_cache) : drop_cache_(drop_page_cache) {
  fd_ = ::open(path.c_str(), O_RDONLY);
  TORCH_CHECK(fd_ >= 0, "cannot open the expert store ", path, ": ", std::strerror(errno));
  // Misses are random reads of whole records: no readahead, which would pull neighbouring experts
  // into the page cache and turn later misses into memory copies.
  ::posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM);
  if (drop_cache_) ::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED);
}

ExpertCache::~ExpertCache() {
  if (fd_ >= 0) ::close(fd_);
}

const ExpertCache::Layer& ExpertCache::layer_at(int64_t layer) const {
  TORCH_CHECK(layer >= 0 && layer < (int64_t)layers_.size() && layers_[layer].present, "expert cache: layer ", layer,
              " was not added");
  return layers_[layer];
}

void ExpertCache::add_layer(int64_t layer, const at::Tensor& record_offsets, std::vector<at::Tensor> slots) {
  TORCH_CHECK(layer >= 0, "expert cache: negative layer ", layer);
  TORCH_CHECK(!slots.empty(), "expert cache: a layer needs at least one part");
  const int64_t C = slots[0].dim() > 0 ? slots[0].size(0) : 0;
  TORCH_CHECK(C > 0, "expert cache: layer ", layer, " has no slots");
  at::Tensor offs = record_offsets.to(at::kLong).contiguous();
  TORCH_CHECK(offs.dim() == 1 && offs.size(0) > 0, "expert cache: record_offsets must be int64 [E]");
  if ((int64_t)layers_.size() <= layer) layers_.resize(layer + 1);
  Layer& L = layers_[layer];
  TORCH_CHECK(!L.present, "expert cache: layer ", layer, " added twice");
  L = Layer();
  L.present = true;
  for (const at::Tensor& s : slots) {
    TORCH_CHECK(s.is_contiguous() && s.dim() > 0 && s.size(0) == C, "expert cache: every part needs ", C,
                " contiguous slots");
    L.slot_bytes.push_back((int64_t)s.nbytes() / C);
    L.record_bytes += L.slot_bytes.back();
  }
  L.slots = std::move(slots);
  const int64_t E = offs.size(0);
  L.record_offset.assign(offs.data_ptr<int64_t>(), offs.data_ptr<int64_t>() + E);
  L.slot_of.assign(E, -1);
  L.expert_of.assign(C, -1);
  L.last_use.assign(C, 0);
}

int64_t ExpertCache::resident_bytes() const {
  int64_t total = 0;
  for (const Layer& L : layers_) total += L.resident * L.record_bytes;
  return total;
}

// One expert into a slot with one preadv of its record (the parts back to back, straight into the
// slots); a short read continues where it stopped.
void ExpertCache::read_record(Layer& L, int64_t e, int64_t slot) {
  const int nparts = (int)L.slots.size();
  std::vector<struct iovec> iov(nparts);
  for (int p = 0; p < nparts; ++p) {
    iov[p].iov_base = static_cast<uint8_t*>(L.slots[p].data_ptr()) + slot * L.slot_bytes[p];
    iov[p].iov_len = (size_t)L.slot_bytes[p];
  }
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t off = L.record_offset[e];
  int64_t done = 0;
  int first = 0;
  while (done < L.record_bytes) {
    const ssize_t r = ::preadv(fd_, iov.data() + first, nparts - first, off + done);
    TORCH_CHECK(r > 0, "expert store: read of expert ", e, " failed at offset ", off + done, ": ",
                r == 0 ? "unexpected end of file" : std::strerror(errno));
    done += r;
    for (int64_t left = r; left > 0 && first < nparts;) {
      const int64_t take = std::min<int64_t>(left, (int64_t)iov[first].iov_len);
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + take;
      iov[first].iov_len -= take;
      left -= take;
      if (iov[first].iov_len == 0) ++first;
    }
  }
  if (drop_cache_) ::posix_fadvise(fd_, off, L.record_bytes, POSIX_FADV_DONTNEED);
  stats_.read_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stats_.bytes_read += L.record_bytes;
  stats_.misses += 1;
}

void ExpertCache::evict(Layer& L, int64_t slot) {
  L.slot_of[L.expert_of[slot]] = -1;
  L.expert_of[slot] = -1;
  L.resident -= 1;
  resident_ -= 1;
}

// The least recently used expert of the fullest layer that has one to give (in `layer` itself,
// never one of `needed`); false when nothing can go.
bool ExpertCache::evict_for_cap(int64_t layer, const std::vector<char>& needed) {
  int64_t best_layer = -1, best_slot = -1;
  for (int64_t li = 0; li < (int64_t)layers_.size(); ++li) {
    Layer& L = layers_[li];
    if (!L.present || (best_layer >= 0 && L.resident <= layers_[best_layer].resident)) continue;
    int64_t victim = -1;
    for (int64_t c = 0; c < (int64_t)L.expert_of.size(); ++c) {
      const int64_t held = L.expert_of[c];
      if (held < 0 || (li == layer && needed[held])) continue;
      if (victim < 0 || L.last_use[c] < L.last_use[victim]) victim = c;
    }
    if (victim >= 0) best_layer = li, best_slot = victim;
  }
  if (best_layer < 0) return false;
  evict(layers_[best_layer], best_slot);
  return true;
}

std::vector<int64_t> ExpertCache::fetch(int64_t layer, const std::vector<int64_t>& need,
                                        const std::vector<int64_t>& pinned) {
  layer_at(layer);  // checks it exists
  Layer& L = layers_[layer];
  const int64_t E = (int64_t)L.slot_of.size(), C = (int64_t)L.expert_of.size();
  std::vector<char> needed(E, 0);
  for (const std::vector<int64_t>* list : {&need, &pinned})
    for (int64_t e : *list) {
      TORCH_CHECK(e >= 0 && e < E, "expert cache: expert ", e, " out of range [0, ", E, ")");
      needed[e] = 1;
    }
  std::vector<int64_t> slots;
  slots.reserve(need.size());
  for (int64_t e : need) {
    ++clock_;
    int64_t s = L.slot_of[e];
    if (s >= 0) {
      stats_.hits += 1;
    } else {
      for (int64_t c = 0; c < C; ++c) {  // a free slot, else the least recently used unneeded one
        const int64_t held = L.expert_of[c];
        if (held < 0) {
          s = c;
          break;
        }
        if (!needed[held] && (s < 0 || L.last_use[c] < L.last_use[s])) s = c;
      }
      TORCH_CHECK(s >= 0, "expert cache: no slot to evict (capacity ", C, ")");
      if (L.expert_of[s] >= 0) evict(L, s);
      while (max_resident_ >= 0 && resident_ >= max_resident_ && evict_for_cap(layer, needed)) {
      }
      read_record(L, e, s);
      L.expert_of[s] = e;
      L.slot_of[e] = s;
      L.resident += 1;
      resident_ += 1;
    }
    L.last_use[s] = clock_;
    slots.push_back(s);
  }
  return slots;
}

void register_expert_cache(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<ExpertCache>(m, "ExpertCache", "RAM cache of routed experts read from an expert store file")
      .def(py::init<const std::string&, bool>(), py::arg("path"), py::arg("drop_page_cache") = false)
      .def("add_layer", &ExpertCache::add_layer, py::arg("layer"), py::arg("record_offsets"), py::arg("slots"))
      .def("fetch", &ExpertCache::fetch, py::arg("layer"), py::arg("need"), py::arg("pinned") = std::vector<int64_t>{},
           py::call_guard<py::gil_scoped_release>())
      .def("set_max_resident", &ExpertCache::set_max_resident, py::arg("n"))
      .def("slots", &ExpertCache::slots, py::arg("layer"))
      .def("capacity", &ExpertCache::capacity, py::arg("layer"))
      .def("resident_bytes", &ExpertCache::resident_bytes)
      .def("stats",
           [](const ExpertCache& c) {
             const CacheStats& s = c.stats();
             return std::map<std::string, double>{{"hits", (double)s.hits},
                                                  {"misses", (double)s.misses},
                                                  {"bytes_read", (double)s.bytes_read},
                                                  {"read_seconds", s.read_seconds}};
           })
      .def("reset_stats", &ExpertCache::reset_stats);
}

}  // namespace mobilemoe_cache
